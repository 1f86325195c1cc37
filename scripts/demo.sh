#!/usr/bin/env bash
# End-to-end demo on this machine: a verification server in the background,
# the edge client drafting with the built-in trained draft and prompt lookup
# (the default) and verifying on the server, then a clean shutdown
# (SIGTERM). Builds and fetches the default model on first run.
set -euo pipefail
cd "$(dirname "$0")/.."
PROMPT="${1:-Write a Python function that checks whether a number is prime.}"
ADDR="${TANDEM_DEMO_ADDR:-127.0.0.1:50051}"

cargo build --release -q -p tandem-server -p tandem-edge
BIN="${CARGO_TARGET_DIR:-target}/release"
"$BIN/tandem-edge" model fetch >/dev/null

LOG="$(mktemp)"
"$BIN/tandem-server" --listen "$ADDR" >"$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; rm -f "$LOG"' EXIT
for _ in $(seq 1 600); do
    grep -q "listening on" "$LOG" && break
    kill -0 $SERVER 2>/dev/null || { cat "$LOG"; exit 1; }
    sleep 0.1
done
echo "server: $(grep 'listening on' "$LOG")"

"$BIN/tandem-edge" generate --server "http://$ADDR" --max-new-tokens 96 --prompt "$PROMPT"

kill -TERM $SERVER
wait $SERVER
echo "server stopped cleanly"
