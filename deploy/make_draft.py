#!/usr/bin/env python3
"""make_draft.py: builds a draft model for speculative decoding by truncating a GGUF to its first N layers.

    deploy/make_draft.py MODEL.gguf OUT.gguf [--layers N]      (default N = 8)

The draft keeps token_embd, output_norm, output (when the model has one) and blk.0 .. blk.N-1, byte for byte
in their stored quantization, and every metadata key of the input with its own type, so the tokenizer, chat
template and KV layout per layer are those of the full model (a draft must share the target's vocabulary).
Only `<arch>.block_count` (:= N) and `general.name` (:= "<name> draft L<N>", so workers and logs tell the two
apart) change, and an `<arch>.*` array with one entry per layer (no llama GGUF has one) is cut to N. It does
not fine-tune or distil anything: acceptance is whatever the first N real layers give.

Uses only the gguf package (GGUFReader / GGUFWriter) and numpy. Exit codes: 0 written, 1 unreadable or
malformed input, 2 bad arguments (N < 1 or N > block_count included).
"""
import argparse
import os
import re
import sys

import gguf
from gguf import GGUFValueType

# Keys GGUFWriter writes itself: the header counts, and general.architecture (passed to its constructor).
_WRITER_KEYS = {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count", "general.architecture"}
_BLK = re.compile(r"^blk\.(\d+)\.")


class UsageError(Exception):
    """A bad argument (exit 2), as opposed to an input this tool cannot read (exit 1)."""


def _field_value(field):
    """(value, type, sub_type) of a reader field in the form GGUFWriter.add_key_value takes back unchanged.
    Strings stay bytes: contents() would decode them as UTF-8 and could not carry a token that is not valid
    UTF-8; the writer accepts bytes for STRING as they are."""
    main = field.types[0]
    if main == GGUFValueType.ARRAY:
        sub = field.types[-1]
        if len(field.types) != 2:
            raise ValueError(f"{field.name}: nested arrays are not supported")
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]) for i in field.data], main, sub
        return [field.parts[i].tolist()[0] for i in field.data], main, sub
    if main == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]), main, None
    return field.parts[field.data[0]].tolist()[0], main, None


def _keep_tensor(name, n_layers):
    m = _BLK.match(name)
    if m:
        return int(m.group(1)) < n_layers
    return name in ("token_embd.weight", "output_norm.weight", "output.weight")


def make_draft(src, dst, n_layers):
    """Writes the draft; returns (tensors written, bytes of tensor data). Raises UsageError on a bad N (before
    anything is written) and RuntimeError / ValueError / OSError on input this tool cannot read."""
    if n_layers < 1:  # before the (slow) read of the whole header
        raise UsageError(f"--layers must be at least 1, got {n_layers}")
    r = gguf.GGUFReader(src)
    arch_field = r.fields.get("general.architecture")
    if arch_field is None:
        raise RuntimeError("no general.architecture")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode("utf-8")
    bc_key = f"{arch}.block_count"
    if bc_key not in r.fields:
        raise RuntimeError(f"no {bc_key}")
    block_count = int(r.fields[bc_key].contents())
    if n_layers < 1 or n_layers > block_count:
        raise UsageError(f"--layers must be in [1, {block_count}] ({src} has {block_count} layers), got {n_layers}")

    w = gguf.GGUFWriter(dst, arch)
    for key, field in r.fields.items():
        if key in _WRITER_KEYS:
            continue
        val, vtype, sub = _field_value(field)
        if key == bc_key:
            val = n_layers
        elif key == "general.name":
            val = val + f" draft L{n_layers}".encode("utf-8")
        elif key.startswith(arch + ".") and vtype == GGUFValueType.ARRAY and len(val) == block_count:
            # a per-layer hyperparameter array (some archs have them): one entry per kept layer
            val = val[:n_layers]
        if key == "general.alignment":
            # sets the writer's data alignment too, so tensor offsets pad as in the input
            w.add_custom_alignment(int(val))
        else:
            w.add_key_value(key, val, vtype, sub_type=sub)
    if "general.name" not in r.fields:
        w.add_key_value("general.name", f"draft L{n_layers}", GGUFValueType.STRING)

    names = {t.name for t in r.tensors}
    for base in ("token_embd.weight", "output_norm.weight"):
        if base not in names:
            raise RuntimeError(f"no tensor {base}")
    if not any(n.startswith(f"blk.{n_layers - 1}.") for n in names):
        raise RuntimeError(f"no tensors for layer {n_layers - 1}")
    n_tensors = n_bytes = 0
    for t in r.tensors:
        if not _keep_tensor(t.name, n_layers):
            continue
        # t.data is the stored bytes: for quantized types a uint8 array whose last axis is bytes per row,
        # for F32/F16 the elements; both in numpy (reversed ne) order. GGUFWriter wants exactly that shape
        # as raw_shape and turns a uint8 byte shape back into the element shape itself. Passing the element
        # shape (or t.shape, which is ne order) would write wrong dimensions for quantized tensors.
        w.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
        n_tensors += 1
        n_bytes += int(t.n_bytes)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return n_tensors, n_bytes


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="input GGUF (the target model)")
    ap.add_argument("out", help="output GGUF (the draft)")
    ap.add_argument("--layers", type=int, default=8, help="transformer layers to keep (default 8)")
    a = ap.parse_args()
    if os.path.abspath(a.model) == os.path.abspath(a.out):
        print("make_draft: output would overwrite the input", file=sys.stderr)
        return 2
    try:
        n_tensors, n_bytes = make_draft(a.model, a.out, a.layers)
    except UsageError as e:
        print(f"make_draft: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError, ValueError) as e:
        print(f"make_draft: {a.model}: {e}", file=sys.stderr)
        if os.path.exists(a.out):
            os.unlink(a.out)  # never leave a half-written draft that looks like a model
        return 1
    print(f"{a.out}: layers={a.layers} tensors={n_tensors} tensor_bytes={n_bytes} bytes={os.path.getsize(a.out)}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
