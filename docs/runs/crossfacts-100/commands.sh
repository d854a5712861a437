#!/usr/bin/env bash
# Real FedAttn runs for docs/comparison.md (legacy-format folders, written by main at the commit of /work/wt-runs)
set -u
# run with fedattn as of commit b40bf64 (folders in the earlier format, converted by `fedattn results upgrade`)
F="nice -n 19 fedattn"
M="--model qwen2.5-coder-0.5b-instruct --dtype bfloat16"
C="$M --count 200 --limit 100 --parties 3 --batch-size 16 --max-new-tokens 32"
cd docs/runs/crossfacts-100
$F eval crossfacts $C --mode centralized --out cf-centralized --json > cf-centralized.log 2>&1
$F eval crossfacts $C --schedule retrieval --out cf-retrieval --json > cf-retrieval.log 2>&1
$F eval crossfacts $C --mode alone --out cf-alone --json > cf-alone.log 2>&1
$F eval crossfacts $C --sync-every 1 --out cf-h1 --json > cf-h1.log 2>&1
$F eval crossfacts $C --schedule publisher-dense --out cf-pdense --json > cf-pdense.log 2>&1
$F eval crossfacts $C --sync-every 4 --out cf-h4 --json > cf-h4.log 2>&1
$F attack $M --blocks 0,1,4,8,16,23 --noise 0 --kv-codec bfloat16 --source crossfacts --count 10 --out attack-bf16 > attack-bf16.log 2>&1
$F attack $M --blocks 0,1,4,8,16,23 --noise 0 --kv-codec int4-kivi --source crossfacts --count 10 --out attack-int4kivi > attack-int4kivi.log 2>&1
echo done > ALL_DONE
