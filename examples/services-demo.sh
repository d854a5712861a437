#!/usr/bin/env bash
# Three parties that stay up (`make demo-services`): a throwaway federation on loopback, one
# `fedattn serve` per party (the HR office and the warehouse serve their documents, the publisher
# serves none), then two questions asked with `fedattn ask`, each a query over gRPC with mutual TLS.
# Everything is in a temporary folder, removed at the end with the services, also on error or Ctrl-C.
set -euo pipefail
FEDATTN=${FEDATTN:-.venv/bin/fedattn}
MODEL=${MODEL:-qwen2.5-coder-0.5b-instruct}
HERE=$(cd "$(dirname "$0")" && pwd)
FOLDER=$(mktemp -d -t fedattn-services-XXXXXX)
SERVICES=()

stop_services() {
    for pid in "${SERVICES[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${SERVICES[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$FOLDER"
}
trap stop_services EXIT

"$FEDATTN" federation init "$FOLDER/fed" --parties party-1,party-2,publisher \
    --addresses "$(python3 -c 'import socket
s=[socket.socket() for _ in range(3)]
[x.bind(("127.0.0.1", 0)) for x in s]
print(",".join(f"127.0.0.1:{x.getsockname()[1]}" for x in s))')" >/dev/null
ROSTER="$FOLDER/fed/roster.toml"
echo "== Starting three services (each loads $MODEL once; their one-line query logs go to stderr)"
"$FEDATTN" serve --roster "$ROSTER" --name party-1 --model "$MODEL" --context @"$HERE/demo/party1.txt" & SERVICES+=($!)
"$FEDATTN" serve --roster "$ROSTER" --name party-2 --model "$MODEL" --context @"$HERE/demo/party2.txt" & SERVICES+=($!)
"$FEDATTN" serve --roster "$ROSTER" --name publisher --model "$MODEL" & SERVICES+=($!)

ask() {
    "$FEDATTN" ask --roster "$ROSTER" --name publisher --schedule retrieval --max-new-tokens 24 --question "$1"
}
# The first ask waits until every service has loaded its model and listens.
for attempt in $(seq 1 60); do
    if "$FEDATTN" ask --roster "$ROSTER" --name publisher --max-new-tokens 1 --question "Ready?" >/dev/null 2>&1; then
        break
    fi
    [ "$attempt" -lt 60 ] || { echo "the services did not come up" >&2; exit 1; }
    sleep 2
done
echo "== Question 1 (the answer is in party-1's HR record)"
ask "What is Marta Kowalski's employee ID? Answer with the number only."
echo "== Question 2, same services, no model load (the answer is in party-2's warehouse log)"
ask "Which city did parcel 88 leave from? Answer with the city only."
