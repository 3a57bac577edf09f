#!/usr/bin/env python3
"""Checks the router's OpenAI response bodies against the official `openai` package's pydantic models.

The C unit test writes one JSON body per file when RT_OPENAI_DUMP_DIR is set:

    RT_OPENAI_DUMP_DIR=/tmp/rt_shapes ./build/tests/test_rt_openai
    /opt/pdtools/bin/python tests/golden/openai/check_openai_shapes.py /tmp/rt_shapes

A file named <kind>__<case>.json is validated with the model for <kind>. Besides model_validate (types,
required fields, literals such as object and finish_reason), every object must use only fields the model
declares: the openai models accept unknown keys (extra="allow"), which would hide a misspelt field.
Exit status 0 when every file passes. Needs only `openai` (pinned in tests/golden/requirements.txt).
"""
import json
import pathlib
import sys
from typing import List

import openai
import pydantic
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.shared import ErrorObject


class ErrorBody(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    error: ErrorObject


class ModelList(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    object: str
    data: List[Model]


def completion_chunk(obj):
    # A streamed legacy completion uses the Completion shape ("both the streamed and non-streamed response
    # objects share the same shape"), but every chunk before the last has finish_reason null, which the
    # model's Literal does not admit (the SDK parses streams without validation). Check null is the only
    # deviation, then validate the rest.
    patched = dict(obj)
    patched["choices"] = [
        dict(c, finish_reason="stop") if c.get("finish_reason", "missing") is None else c
        for c in obj.get("choices", [])
    ]
    return Completion.model_validate(patched)


KINDS = {
    "completion": Completion.model_validate,
    "completion_chunk": completion_chunk,
    "chat_completion": ChatCompletion.model_validate,
    "chat_chunk": ChatCompletionChunk.model_validate,
    "error": ErrorBody.model_validate,
    "models": ModelList.model_validate,
}


def extras(m, path="$"):
    """Paths of keys that the model does not declare, recursively."""
    out = []
    if isinstance(m, pydantic.BaseModel):
        for k in (m.model_extra or {}):
            out.append(f"{path}.{k}")
        for name in type(m).model_fields:
            out += extras(getattr(m, name), f"{path}.{name}")
    elif isinstance(m, list):
        for i, v in enumerate(m):
            out += extras(v, f"{path}[{i}]")
    return out


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    files = sorted(pathlib.Path(sys.argv[1]).glob("*.json"))
    if not files:
        sys.exit(f"no *.json in {sys.argv[1]}")
    n_fail = n_pass = 0
    seen = set()
    for f in files:
        kind = f.name.split("__", 1)[0]
        seen.add(kind)
        try:
            obj = json.loads(f.read_bytes())
            if kind not in KINDS:
                raise ValueError(f"unknown kind {kind!r}")
            m = KINDS[kind](obj)
            bad = extras(m)
            if bad:
                raise ValueError(f"fields the model does not declare: {bad}")
            n_pass += 1
            print(f"ok   {f.name}")
        except Exception as e:  # report every file, then fail
            n_fail += 1
            print(f"FAIL {f.name}: {e}")
    missing = set(KINDS) - seen
    if missing:
        n_fail += 1
        print(f"FAIL no sample of {sorted(missing)}")
    print(f"openai {openai.__version__}, pydantic {pydantic.VERSION}: {n_pass} passed, {n_fail} failed")
    sys.exit(1 if n_fail else 0)


if __name__ == "__main__":
    main()
