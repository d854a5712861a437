#!/bin/sh
# What was actually run for issue 12 (2026-12-05, the shared 2-core VM, load 2-7, one thread per
# process, two or three processes at once), from this folder; commands.sh is the larger plan.
# float32 model, float32 hidden states on the wire (the split's default, lossless), greedy; the noise
# drawn from a fresh secret seed per session. Times in the summaries are under that load.
set -u
M=qwen2.5-coder-0.5b-instruct
SPLIT="--system split --model $M"
# BoolQ, first 50 dev questions: the model alone (the centralized reference) and split without noise
fedattn eval boolq --limit 50 --batch-size 8 --system specfed --worker $M --draft lookup --gamma 0 --top-k all --out boolq-alone
fedattn eval boolq --limit 50 --batch-size 8 $SPLIT --client-blocks 2,2 --out boolq-a2c2-r0
# GSM8K 4-shot, first 20 test problems (10 for the last three)
fedattn eval gsm8k --limit 20 --batch-size 5 $SPLIT --client-blocks 2,2 --out gsm8k-a2c2-r0
fedattn eval gsm8k --limit 20 --batch-size 5 $SPLIT --client-blocks 2,2 --noise-relative 0.3 --out gsm8k-a2c2-r0.3
fedattn eval gsm8k --limit 20 --batch-size 5 $SPLIT --client-blocks 2,2 --noise-relative 1 --out gsm8k-a2c2-r1
fedattn eval gsm8k --limit 20 --batch-size 5 $SPLIT --client-blocks 5,2 --noise-relative 1 --out gsm8k-a5c2-r1
fedattn eval gsm8k --limit 10 --batch-size 5 $SPLIT --client-blocks 2,2 --noise-relative 3 --out gsm8k-a2c2-r3
fedattn eval gsm8k --limit 10 --batch-size 5 $SPLIT --client-blocks 5,2 --noise-relative 10 --out gsm8k-a5c2-r10
fedattn eval gsm8k --limit 10 --batch-size 5 $SPLIT --client-blocks 2,2 --noise-relative 0 --reply-noise 0.3 --out gsm8k-a2c2-reply0.3
# the comparison rows and plots, with the leakage of ../split-leakage and FedAttn's of ../crossfacts-100
A="--attack ../split-leakage/search-A1-rel --attack ../split-leakage/search-A2-rel --attack ../split-leakage/search-A2-rel-high"
A="$A --attack ../split-leakage/search-A3-rel --attack ../split-leakage/search-A5-rel --attack ../split-leakage/search-A5-rel-high"
fedattn plot gsm8k-* $A --out plots
S=../gsm8k-specfed
fedattn compare ../crossfacts-100/cf-* $S/ensemble-full $S/k1517-redistribute-packed $S/alone-0.5b $S/alone-1.5b \
    boolq-* gsm8k-* ../refine-eval/arc-challenge-* ../refine-eval/openbookqa-* --attack ../crossfacts-100/attack-bf16 --attack ../crossfacts-100/attack-int4kivi $A \
    --out ../../comparison.md
