#!/usr/bin/env bash
# What was actually run for issue 12 (2026-12-05, the shared 2-core VM, one thread per process),
# from this folder; commands.sh is the larger plan. Relative noise levels, to match the quality runs
# of ../split-eval; 3 CrossFacts victims (489 private tokens), float32 model and hidden states.
set -u
M="--model qwen2.5-coder-0.5b-instruct --dtype float32 --source crossfacts --count 3"
S="$M --attack search --shortlist 64 --train-tokens 8000"
D="$M --attack decoder --train-tokens 6000 --decoder-blocks 1 --decoder-epochs 2"
fedattn attack-split $S --client-blocks 1 --noise 0,0.1,0.3,1 --noise-relative --out search-A1-rel   # 2.4 min
fedattn attack-split $S --client-blocks 2 --noise 0,0.1,0.3,1 --noise-relative --out search-A2-rel   # 6.1 min
fedattn attack-split $D --client-blocks 1 --noise 0.3,1 --noise-relative --out decoder-A1-rel        # 7.1 min
fedattn attack-split $S --client-blocks 5 --noise 0.3,1 --noise-relative --out search-A5-rel         # 4.7 min
fedattn attack-split $D --client-blocks 5 --noise 0.3,1 --noise-relative --out decoder-A5-rel        # 5.9 min
fedattn attack-split $S --client-blocks 3 --noise 0.3,1 --noise-relative --out search-A3-rel         # 2.6 min
fedattn attack-split $S --client-blocks 2 --noise 3,10 --noise-relative --out search-A2-rel-high     # 1.4 min
fedattn attack-split $S --client-blocks 5 --noise 3,10 --noise-relative --out search-A5-rel-high     # 3.1 min
