"""test_make_draft.py: deploy/make_draft.py (a draft model for speculative decoding = the first N layers of a
GGUF) checked independently of the tool's own output:

- arguments: --layers 0 and --layers block_count+1 exit 2 and write nothing;
- a 4-layer draft re-read with GGUFReader: block_count 4, general.name "<name> draft L4", every other key
  (tokenizer, chat template, hyperparameters) byte-identical to the source's, the tensor set and order the
  source's filtered to token_embd / output_norm / output / blk.0-3, each tensor's type, shape and bytes equal
  to the source's, data offsets aligned;
- with --layers = block_count the tensor data section is the source's byte for byte;
- logits: the C engine (dump_logits) on the draft agrees with the numpy float64 reference
  (tests/golden/ref_forward_numpy.py) on the draft within the golden logits tolerance of
  tests/unit/engine/test_eng_forward.c (the reference on the draft = the source's first 4 layers, since the
  tensors and hyperparameters are byte-identical, checked above).
Acceptance of the draft (how often it agrees with the full model) is not tested: it is what it is.

Env: PD_DUMP_LOGITS_BIN (set by tests/CMakeLists.txt) or PD_BUILD_DIR (default build/) for dump_logits; the
model from PDSERVE_MODEL or the default model cache.
"""
import os
import subprocess
import sys
import tempfile

import numpy as np
import gguf

from cluster import BUILD, ROOT, model_path, run_tests

sys.path.insert(0, os.path.join(ROOT, "tests", "golden"))
from ref_forward_numpy import GGUFLlama  # noqa: E402

MAKE_DRAFT = os.path.join(ROOT, "deploy", "make_draft.py")
N_LAYERS = 4
IDS = [1, 504, 3458, 282, 4649, 314]
# as LOGIT_ABS_TOL in tests/unit/engine/test_eng_forward.c: our f32 engine vs a float reference
LOGIT_ABS_TOL = 1e-3

SRC = model_path()
TMP = tempfile.mkdtemp(prefix="pd_make_draft_")
DRAFT = os.path.join(TMP, f"draft_l{N_LAYERS}.gguf")
_readers = {}


def reader(path):
    """One GGUFReader per file: parsing this model's 100k tokenizer strings takes seconds."""
    if path not in _readers:
        _readers[path] = gguf.GGUFReader(path)
    return _readers[path]


def dump_logits_bin():
    path = os.environ.get("PD_DUMP_LOGITS_BIN") or os.path.join(BUILD, "tests", "dump_logits")
    if not os.access(path, os.X_OK):
        raise FileNotFoundError(f"no dump_logits at {path} (set PD_DUMP_LOGITS_BIN or PD_BUILD_DIR)")
    return path


def make_draft(out, *args):
    return subprocess.run([sys.executable, MAKE_DRAFT, SRC, out, *args], capture_output=True, text=True,
                          timeout=120)


def field_bytes(f):
    """Every part of a field as stored (key, type tags, lengths, value), for byte-exact comparison."""
    return [bytes(p) for p in f.parts]


def data_section(path, reader):
    with open(path, "rb") as fp:
        fp.seek(reader.data_offset)
        return fp.read()


def test_bad_layers():
    n = int(reader(SRC).fields["llama.block_count"].contents())
    for bad in ("0", str(n + 1)):
        out = os.path.join(TMP, f"bad_{bad}.gguf")
        r = make_draft(out, "--layers", bad)
        assert r.returncode == 2, (bad, r.returncode, r.stderr)
        assert "--layers" in r.stderr, r.stderr
        assert not os.path.exists(out), f"--layers {bad} left {out}"


def test_build_draft():
    r = make_draft(DRAFT, "--layers", str(N_LAYERS))
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip()
    assert "\n" not in line and line.startswith(DRAFT) and f"layers={N_LAYERS}" in line, line
    assert f"bytes={os.path.getsize(DRAFT)}" in line, line


def test_metadata():
    src, dr = reader(SRC), reader(DRAFT)
    assert int(dr.fields["llama.block_count"].contents()) == N_LAYERS
    assert dr.fields["llama.block_count"].types == src.fields["llama.block_count"].types
    assert dr.fields["general.name"].contents() == src.fields["general.name"].contents() + f" draft L{N_LAYERS}"
    changed = {"llama.block_count", "general.name", "GGUF.tensor_count", "GGUF.kv_count"}
    assert set(dr.fields) == set(src.fields), set(dr.fields) ^ set(src.fields)
    for key, f in src.fields.items():
        if key not in changed:
            assert field_bytes(dr.fields[key]) == field_bytes(f), f"{key} differs"
    # the ones that matter most to a draft, spelled out: same tokenizer, same chat template
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "tokenizer.chat_template", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.bos_token_id"):
        assert dr.fields[key].contents() == src.fields[key].contents(), key


def test_tensors():
    src, dr = reader(SRC), reader(DRAFT)
    keep = {"token_embd.weight", "output_norm.weight", "output.weight"}
    want = [t for t in src.tensors
            if t.name in keep or any(t.name.startswith(f"blk.{i}.") for i in range(N_LAYERS))]
    assert [t.name for t in dr.tensors] == [t.name for t in want]
    assert len(want) == 2 + ("output.weight" in {t.name for t in src.tensors}) + 9 * N_LAYERS
    align = int(src.fields["general.alignment"].contents()) if "general.alignment" in src.fields else 32
    assert dr.alignment == align and dr.data_offset % align == 0
    for a, b in zip(want, dr.tensors):
        assert b.tensor_type == a.tensor_type, a.name
        assert [int(x) for x in b.shape] == [int(x) for x in a.shape], (a.name, b.shape, a.shape)
        assert b.n_elements == a.n_elements and b.n_bytes == a.n_bytes, a.name
        assert (b.data_offset - dr.data_offset) % align == 0, a.name
        assert np.asarray(b.data).tobytes() == np.asarray(a.data).tobytes(), f"{a.name}: bytes differ"


def test_all_layers_is_a_copy():
    src = reader(SRC)
    n = int(src.fields["llama.block_count"].contents())
    out = os.path.join(TMP, "all_layers.gguf")
    r = make_draft(out, "--layers", str(n))
    assert r.returncode == 0, r.stderr
    dr = gguf.GGUFReader(out)
    assert data_section(out, dr) == data_section(SRC, src), "tensor data section differs"
    assert [(t.name, int(t.data_offset - dr.data_offset)) for t in dr.tensors] == \
           [(t.name, int(t.data_offset - src.data_offset)) for t in src.tensors]
    del dr
    os.unlink(out)


def test_logits():
    positions = list(range(len(IDS)))
    m = GGUFLlama(DRAFT)
    assert m.n_layer == N_LAYERS
    ref = m.forward(IDS, positions)  # (T, vocab) float64
    del m

    r = subprocess.run([dump_logits_bin(), DRAFT, *map(str, IDS)], capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    ours = np.frombuffer(r.stdout, dtype="<f4").reshape(len(IDS), -1).astype(np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    for p in positions:
        d = float(np.max(np.abs(ours[p] - ref[p])))
        top2 = np.sort(ref[p])[-2:]
        print(f"     pos {p}: max|engine f32 - numpy f64| = {d:.2e}, argmax {int(np.argmax(ours[p]))} "
              f"vs {int(np.argmax(ref[p]))} (margin {top2[1] - top2[0]:.3f})", flush=True)
        assert d <= LOGIT_ABS_TOL, f"pos {p}: max |logit diff| {d:.3e}"
        if top2[1] - top2[0] > 2 * LOGIT_ABS_TOL:
            assert np.argmax(ours[p]) == np.argmax(ref[p]), p


def main():
    try:
        return run_tests([test_bad_layers, test_build_draft, test_metadata, test_tensors, test_all_layers_is_a_copy,
                          test_logits])
    finally:
        for name in os.listdir(TMP):
            os.unlink(os.path.join(TMP, name))
        os.rmdir(TMP)


if __name__ == "__main__":
    sys.exit(main())
