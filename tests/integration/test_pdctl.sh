#!/usr/bin/env bash
# test_pdctl.sh PDCTL: the pdctl CLI end to end on the default model: a greedy completion equals the
# Hugging Face reference (tests/golden/logits/capital_france: ids 7042 30 198 198 504 2988 314 42, which
# HF's tokenizer decodes to " Paris.\n\nThe answer is:"), a seeded sampled run repeats exactly, and bad
# flags, out-of-range values and missing files give a one-line error and a non-zero exit.
set -u
PDCTL="$1"
pass=0
fail=0
s_check() { # name, condition result
    if [ "$2" -eq 0 ]; then pass=$((pass + 1)); echo "ok   $1"; else fail=$((fail + 1)); echo "FAIL $1"; fi
}
s_expect_error() { # name, expected exit code, stderr pattern, args...
    local name=$1 code=$2 pat=$3
    shift 3
    local err rc
    err=$("$PDCTL" generate "$@" 2>&1 >/dev/null)
    rc=$?
    [ "$rc" -eq "$code" ] && [ "$(printf '%s\n' "$err" | wc -l)" -eq 1 ] && printf '%s' "$err" | grep -q -- "$pat"
    s_check "$name (rc=$rc: $err)" $?
}

out=$("$PDCTL" generate --prompt "The capital of France is" --temperature 0 --max-tokens 8 --ignore-eos 2>/dev/null)
[ "$out" = $' Paris.\n\nThe answer is:' ]
s_check "greedy completion matches the HF reference" $?

a=$("$PDCTL" generate --prompt "Once upon a time" --seed 7 --max-tokens 12 2>/dev/null)
b=$("$PDCTL" generate --prompt "Once upon a time" --seed 7 --max-tokens 12 2>/dev/null)
[ -n "$a" ] && [ "$a" = "$b" ]
s_check "same seed, same text" $?

out=$("$PDCTL" generate --prompt "The capital of France is" --temperature 0 --max-tokens 8 --ignore-eos \
      --stop "answer" 2>/dev/null)
[ "$out" = $' Paris.\n\nThe ' ]
s_check "stop string cuts the text before it" $?

out=$("$PDCTL" generate --chat --prompt "What is the capital of France?" --temperature 0 --max-tokens 40 2>&1)
printf '%s' "$out" | grep -q "finish=stop"
s_check "chat completion ends at end-of-turn" $?

s_expect_error "negative temperature" 2 "temperature" --prompt x --temperature -1
s_expect_error "top-p zero" 2 "top-p" --prompt x --top-p 0
s_expect_error "non-numeric max-tokens" 2 "max-tokens" --prompt x --max-tokens 5x
s_expect_error "unknown flag" 2 "unknown option" --prompt x --bogus
s_expect_error "missing value" 2 "needs a value" --prompt
s_expect_error "missing prompt" 2 "prompt is required"
s_expect_error "missing model file" 1 "cannot open" --model /nonexistent/model.gguf --prompt x
s_expect_error "too many stops" 2 "stop" --prompt x --stop 1 --stop 2 --stop 3 --stop 4 --stop 5 --stop 6 \
    --stop 7 --stop 8 --stop 9
"$PDCTL" bogus >/dev/null 2>&1
[ $? -eq 2 ]
s_check "unknown command" $?

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
