#!/usr/bin/env bash
# Capacity of one replica vs two behind nginx (deploy/nginx/tandem.conf),
# measured with `tandem-bench live --capacity` through the proxy.
# On a machine with fewer cores than replicas need, the replicas share
# cores: the ratio then measures the proxy and scheduling, not hardware.
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION="${DURATION:-10}"
cargo build --release -q -p tandem-server -p tandem-bench
BIN="${CARGO_TARGET_DIR:-target}/release"
NGINX="${TANDEM_NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}"
WORK="$(mktemp -d)"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

start_replica() { # port
    "$BIN/tandem-server" --listen "127.0.0.1:$1" >"$WORK/replica-$1.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 1 600); do grep -q "listening on" "$WORK/replica-$1.log" && return; sleep 0.1; done
    echo "replica on $1 did not start"; cat "$WORK/replica-$1.log"; exit 1
}

start_nginx() { # listen-port replica-ports...
    local listen=$1; shift
    local prefix="$WORK/nginx-$listen"
    mkdir -p "$prefix/temp"; chmod -R a+rwx "$prefix"
    local servers=""
    for p in "$@"; do servers+="        server 127.0.0.1:$p max_fails=1 fail_timeout=10s;\n"; done
    awk -v servers="$servers" -v listen="$listen" '
        /^ *server 127\.0\.0\.1:/ { if (!done) { printf "%s", servers; done = 1 } next }
        { sub(/listen 127\.0\.0\.1:50050/, "listen 127.0.0.1:" listen); print }
        /^worker_processes/ { print "master_process off;" }' deploy/nginx/tandem.conf >"$prefix/nginx.conf"
    "$NGINX" -p "$prefix" -c "$prefix/nginx.conf" 2>"$prefix/error.log" &
    PIDS+=($!)
    sleep 0.5
}

start_replica 50061
start_replica 50062
start_nginx 50071 50061
start_nginx 50072 50061 50062

for n in 1 2; do
    echo "== $n replica(s) behind nginx"
    "$BIN/tandem-bench" live --server "http://127.0.0.1:5007$n" --policies wisp --capacity \
        --duration-s "$DURATION" --devices 2 --out "$WORK/out-$n" >/dev/null
    python3 - "$WORK/out-$n/report.json" "$n" >>"$WORK/capacity.txt" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))["policies"][0]
print(sys.argv[2], r["capacity"]["load"], r["capacity"]["unit"], r["goodput_tok_s"])
PY
done
python3 - "$WORK/capacity.txt" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1])]
for n, cap, unit, goodput in rows:
    print(f"{n} replica(s): capacity {cap} {unit} at >= 90 % SLO attainment")
one, two = float(rows[0][1]), float(rows[1][1])
print(f"scaling ratio (2 replicas / 1): {two / one:.2f}" if one > 0 else "one replica met no load")
PY
