#!/usr/bin/env bash
# Split inference (FedSEA) leakage: what a curious server recovers of a client's prompt from the
# noisy h_A it receives, on the first 3 CrossFacts collaborator documents that `fedattn attack`
# uses for FedAttn (docs/runs/crossfacts-100/attack-*), with qwen2.5-coder-0.5b-instruct in float32
# and the split system's default hidden-state codec (float32: 896 x 4 = 3,584 bytes per token sent).
#
# One command per results folder; each is sized to finish in about 15 minutes or less on 2 shared
# CPU cores (estimates beside each, from one timing probe of the real model on the busy VM,
# load average about 7: search with a 64-token shortlist 0.155 s per position at A=1 and 1.18 s at
# A=5, about 0.26 s more per block; one decoder step of 256 tokens 7.3 s; h_A of public text about
# 200 token-blocks per second). 3 victims = 537 positions (about 500 private tokens).
# Every command resumes where it stopped (rerun it after an interruption; a decoder in training
# resumes from its checkpoint in FOLDER/decoders/, removed once its point is recorded). The whole list is about 6.5 hours; run it in this order
# (the cheapest and most telling first) and stop wherever you like.
set -u
cd "$(dirname "$0")"
F="nice -n 19 fedattn attack-split"
M="--model qwen2.5-coder-0.5b-instruct --dtype float32 --source crossfacts --count 3"
S="$M --attack search --shortlist 64 --train-tokens 8000"
D="$M --attack decoder --train-tokens 6000 --decoder-blocks 1 --decoder-epochs 2"

run() {  # run FOLDER OPTIONS...: one resumable folder, its log beside it
    local folder=$1
    shift
    $F "$@" --out "$folder" > "$folder.log" 2>&1
}

# -- search (shortlist 64), A = 1 and 2 ------------------------------------------------------------
run search-A1-abs $S --client-blocks 1 --noise 0,0.02,0.1,0.5                    # ~7 min
run search-A1-rel $S --client-blocks 1 --noise 0.1,0.5,1 --noise-relative        # ~6 min
run search-A2-abs-low $S --client-blocks 2 --noise 0,0.02                        # ~9 min
run search-A2-abs-high $S --client-blocks 2 --noise 0.1,0.5                      # ~9 min
run search-A2-rel $S --client-blocks 2 --noise 0.1,0.5,1 --noise-relative        # ~13 min

# -- decoder (the paper's attack; 1 fresh block, frozen public head, 6,000 public tokens, 2 epochs)
# 44 steps per (A, noise) point, ~5.6 min each, two points per command
run decoder-A1-abs-low $D --client-blocks 1 --noise 0,0.02                       # ~12 min
run decoder-A5-abs-low $D --client-blocks 5 --noise 0,0.02                       # ~14 min
run decoder-A1-abs-high $D --client-blocks 1 --noise 0.1,0.5                     # ~12 min
run decoder-A5-abs-high $D --client-blocks 5 --noise 0.1,0.5                     # ~14 min
run decoder-A1-rel-low $D --client-blocks 1 --noise 0.1,0.5 --noise-relative     # ~12 min
run decoder-A1-rel-high $D --client-blocks 1 --noise 1 --noise-relative          # ~6 min
run decoder-A5-rel-low $D --client-blocks 5 --noise 0.1,0.5 --noise-relative     # ~14 min
run decoder-A5-rel-high $D --client-blocks 5 --noise 1 --noise-relative          # ~8 min

# -- search, A = 3 (~6 min per level) and A = 5 (~10.5 min per level, plus ~3.5 min of public h_A)
run search-A3-abs-low $S --client-blocks 3 --noise 0,0.02                        # ~14 min
run search-A3-abs-high $S --client-blocks 3 --noise 0.1,0.5                      # ~14 min
run search-A3-rel-low $S --client-blocks 3 --noise 0.1,0.5 --noise-relative      # ~14 min
run search-A3-rel-high $S --client-blocks 3 --noise 1 --noise-relative           # ~8 min
for level in 0 0.02 0.1 0.5; do
    run "search-A5-abs-$level" $S --client-blocks 5 --noise "$level"             # ~14 min each
done
for level in 0.1 0.5 1; do
    run "search-A5-rel-$level" $S --client-blocks 5 --noise "$level" --noise-relative  # ~14 min each
done

# -- decoder, A = 2 and 3 ---------------------------------------------------------------------------
for depth in 2 3; do
    run "decoder-A$depth-abs-low" $D --client-blocks $depth --noise 0,0.02                    # ~12-13 min
    run "decoder-A$depth-abs-high" $D --client-blocks $depth --noise 0.1,0.5                  # ~12-13 min
    run "decoder-A$depth-rel-low" $D --client-blocks $depth --noise 0.1,0.5 --noise-relative  # ~12-13 min
    run "decoder-A$depth-rel-high" $D --client-blocks $depth --noise 1 --noise-relative       # ~7 min
done
echo done > ALL_DONE
