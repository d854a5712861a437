#!/bin/bash
# FedRefine's real runs as they were run (2-core VM, no GPU, bfloat16 models, two streams of one thread each).
# Training folders keep their features (GBs) outside the repository; their projector.json and log.jsonl are in
# ../refine-train/. The Qwen pair's projector is committed (src/fedattn/systems/fedrefine/projectors/);
# `make refine-projector` trains it again.
set -e
fedattn refine train --receiver qwen2.5-coder-0.5b-instruct --sharer qwen2.5-coder-1.5b-instruct \
  --out refine-qwen --dtype bfloat16 --per-source 50 --held-out 8 --epochs 3 --batch 8 --lr 1e-3 --eval-every 9
fedattn refine train --receiver qwen2.5-coder-0.5b-instruct --sharer gemma3-270m \
  --out refine-gemma --dtype bfloat16 --per-source 20 --held-out 4 --epochs 12 --batch 8 --lr 1e-3 --eval-every 9
E="fedattn eval mc --system refine --dtype bfloat16"
R="--receiver qwen2.5-coder-0.5b-instruct"
Q=qwen2.5-coder-1.5b-instruct
G=gemma3-270m:refine-gemma
for task in arc-challenge openbookqa; do
  $E --task $task --limit 100 $R --out $task-receiver      # run to 50 first, then resumed to 100
  $E --task $task --limit 100 $R --sharer $Q --kv-codec bfloat16 --out $task-c2c-qwen1.5b
  $E --task $task --limit 100 --receiver $Q --out $task-qwen1.5b-alone
  $E --task $task --limit 10 $R --sharer $Q --kv-codec bfloat16 --rephrase --out $task-c2c-qwen1.5b-rephrase
  $E --task $task --limit 10 $R --sharer $Q --exchange text --out $task-t2t-qwen1.5b
  $E --task $task --limit 50 $R --sharer $G --kv-codec bfloat16 --out $task-c2c-gemma
  $E --task $task --limit 30 $R --sharer $Q --sharer $G --kv-codec bfloat16 --out $task-c2c-both
done
# the Gemma base model rambles to 64 tokens (about 10 s a question here): 50 ARC-C, 8 OpenBookQA
$E --task arc-challenge --limit 50 --receiver gemma3-270m --out arc-challenge-gemma-alone
$E --task openbookqa --limit 8 --receiver gemma3-270m --out openbookqa-gemma-alone
python ../../../bench/refine_control.py --task arc-challenge --limit 50 > control-arc-challenge.txt  # zeroed-cache control
fedattn plot --training refine-qwen --training refine-gemma --out plots
for task in arc-challenge openbookqa; do fedattn plot $task-* --out plots/$task; done
# the comparison: from ../split-eval, its own command (as-run.sh there) with ../refine-eval/*-* added
