#!/usr/bin/env bash
# Quick start on a fresh Debian machine (as root): installs what Gantry needs, builds it, and runs
# a demo on this machine — two busybox httpd containers made from a locally built rootfs (no
# registry needed), each answering on its own port on the host network.
set -euo pipefail
cd "$(dirname "$0")/.."

need=(busybox-static libseccomp-dev pkg-config protobuf-compiler curl)
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

cargo build --release -p gantry-agent
agent=$PWD/target/release/gantry-agent
data=${GANTRY_DATA:-/var/lib/gantry}
root=$data/runtime
demo=$data/demo
ctr() { "$agent" ctr --root "$root" "$@"; }

# A root filesystem built here from busybox-static, with a page to serve.
rootfs=$demo/rootfs
if [ ! -x "$rootfs/bin/busybox" ]; then
  mkdir -p "$rootfs"/{bin,etc,proc,dev,sys,tmp,www}
  cp /bin/busybox "$rootfs/bin/busybox"
  for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$rootfs/bin/$a"; done
  echo 'root:x:0:0:root:/root:/bin/sh' >"$rootfs/etc/passwd"
  echo 'root:x:0:' >"$rootfs/etc/group"
fi
echo "hello from gantry" >"$rootfs/www/index.html"

for i in 1 2; do
  id=demo-web-$i
  ctr rm --force "$id" >/dev/null 2>&1 || true
  port=$((8079 + i))
  cat >"$demo/$id.json" <<JSON
{"id": "$id", "rootfs": "$rootfs", "network": "host",
 "process": {"args": ["httpd", "-f", "-p", "127.0.0.1:$port", "-h", "/www"]},
 "resources": {"cpuMillis": 250, "memoryBytes": 33554432, "pids": 64}}
JSON
  ctr run --detach "$demo/$id.json" >/dev/null
done
ctr ps
for port in 8080 8081; do
  for _ in $(seq 50); do curl -fsS "http://127.0.0.1:$port/" 2>/dev/null && break; sleep 0.1; done
done
echo
echo "Logs: $agent ctr --root $root logs demo-web-1"
echo "Stop: $agent ctr --root $root rm --force demo-web-1 demo-web-2"
