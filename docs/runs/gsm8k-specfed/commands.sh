#!/bin/sh
# SpecFed on the first GSM8K test problems (4-shot, greedy), as run for issue 11 on a shared 2-core VM
set -u
W="--worker qwen2.5-coder-1.5b-instruct:0.5 --worker qwen2.5-coder-0.5b-instruct:0.5"
E="fedattn eval gsm8k --system specfed --batch-size 1"
$E $W --draft qwen2.5-coder-0.5b-instruct --gamma 4 --top-k all --limit 4 --out ensemble-full
$E $W --draft qwen2.5-coder-0.5b-instruct --gamma 4 --top-k 1517 --reconstruct redistribute --encoding packed --limit 2 --out k1517-redistribute-packed
$E --worker qwen2.5-coder-0.5b-instruct --draft lookup --gamma 0 --top-k all --limit 4 --out alone-0.5b
$E --worker qwen2.5-coder-1.5b-instruct --draft lookup --gamma 0 --top-k all --limit 4 --out alone-1.5b
python bench/specfed_fidelity.py ensemble-full --out fidelity-T1.json > fidelity-T1.txt
fedattn compare ../crossfacts-100/cf-* ensemble-full k1517-redistribute-packed alone-0.5b alone-1.5b --attack ../crossfacts-100/attack-bf16 --attack ../crossfacts-100/attack-int4kivi --out ../../comparison.md
