#!/usr/bin/env bash
# Makes docs/status.png: the status page of a proxy under load (a simulated SmartLead,
# 3 clients queueing, a few errors), taken by headless Chromium at 1280x800.
#   bash docs/screenshot.sh
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked --bin smartlead-proxy
BIN=$PWD/target/release/smartlead-proxy
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SIM=$(port); PROXY=$(port)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
$BIN simulate --port "$SIM" --windows 10/2s,60/60s >/dev/null 2>&1 & pids+=($!)
SMARTLEAD_API_KEY=sim-key SMARTLEAD_PROXY__UPSTREAM__BASE_URL="http://127.0.0.1:$SIM/api/v1" \
SMARTLEAD_PROXY__SERVER__LISTEN="127.0.0.1:$PROXY" SMARTLEAD_PROXY__LIMIT__WINDOWS=10/2s,60/60s \
SMARTLEAD_PROXY__LIMIT__PER_CLIENT=40/60s SMARTLEAD_PROXY__LOG__LEVEL=warn $BIN >/dev/null 2>&1 & pids+=($!)
sleep 1
load() { # client count
  for _ in $(seq "$2"); do
    curl -s -o /dev/null -H "x-client-id: $1" "http://127.0.0.1:$PROXY/api/v1/campaigns" & pids+=($!)
  done
}
load lead-importer 45
load crm-sync 12
load dashboard 4
curl -s -o /dev/null -H 'x-priority: urgent' "http://127.0.0.1:$PROXY/api/v1/campaigns"
curl -s -o /dev/null "http://127.0.0.1:$PROXY/api/v1/campaigns/404/nothing-here"
sleep 3
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,800 \
  --virtual-time-budget=2000 --screenshot="$PWD/docs/status.png" "http://127.0.0.1:$PROXY/status" 2>/dev/null
echo "docs/status.png written"
