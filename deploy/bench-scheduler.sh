#!/bin/sh
# Scheduler throughput benchmark (on demand, not part of the tests): placements/s from
# submission to all instances assigned, with simulated nodes on the real NodeSession API,
# on the embedded store and on a fresh single-member etcd (Debian etcd-server) on loopback.
#
#   deploy/bench-scheduler.sh [nodes...]      default: 1000 5000
#
# Results go to stdout; BENCHMARKS.md records them.
set -eu
cd "$(dirname "$0")/.."
NODES="${*:-1000 5000}"
ETCD=/usr/bin/etcd
cargo build --release -p gantry-scheduler --example throughput
BIN=target/release/examples/throughput
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

start_etcd() {
    dir=$(mktemp -d)
    "$ETCD" --name bench --data-dir "$dir/data" \
        --listen-client-urls http://127.0.0.1:23790 --advertise-client-urls http://127.0.0.1:23790 \
        --listen-peer-urls http://127.0.0.1:23800 --initial-advertise-peer-urls http://127.0.0.1:23800 \
        --initial-cluster bench=http://127.0.0.1:23800 --quota-backend-bytes 8589934592 \
        >"$dir/etcd.log" 2>&1 &
    ETCD_PID=$!
    ETCD_DIR=$dir
    i=0
    until etcdctl --endpoints http://127.0.0.1:23790 endpoint health >/dev/null 2>&1; do
        i=$((i + 1)); [ $i -lt 100 ] || { cat "$dir/etcd.log"; exit 1; }; sleep 0.1
    done
}

stop_etcd() {
    kill "$ETCD_PID"; wait "$ETCD_PID" 2>/dev/null || true; rm -rf "$ETCD_DIR"
}

for nodes in $NODES; do
    for instances in 10000 50000; do
        "$BIN" --nodes "$nodes" --instances "$instances"
        start_etcd
        "$BIN" --nodes "$nodes" --instances "$instances" --etcd http://127.0.0.1:23790
        stop_etcd
    done
done
