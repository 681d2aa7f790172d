#!/usr/bin/env bash
# Quick start on a fresh Debian machine (as root): installs what Gantry needs, builds it, starts a
# cluster of two nodes on this machine with `gantry up --nodes 2` (each agent in a network
# namespace of its own, a "host" on a bridge), imports a busybox image built here from
# busybox-static into both nodes (no registry needed), runs a Service `web` of two busybox httpd
# replicas publishing port 8080 — one replica per node, since a host port is taken once per node
# — and fetches the page from each host's published port. Rerunnable: every step is skipped or
# repeated harmlessly. `gantry down` stops it all and removes the hosts.
set -euo pipefail
cd "$(dirname "$0")/.."

need=(busybox-static libseccomp-dev pkg-config protobuf-compiler curl iproute2
  containernetworking-plugins iptables)
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

cargo build --release --workspace --bins
bin=$PWD/target/release
gantry=$bin/gantry
agent=$bin/gantry-agent
data=${GANTRY_DATA:-/var/lib/gantry}
net=172.31.250
image=gantry.local/busybox:1
export GANTRY_ADDR=http://$net.1:7700

# A cluster of another shape on this data dir (the single-node one of an earlier version of this
# demo) goes first.
if [ -d "$data/run" ] && [ ! -f "$data/run/hosts" ]; then
  "$gantry" down --data-dir "$data" || true
fi

# The agents own their image stores: import while they are stopped.
mkdir -p "$data/demo"
for i in 1 2; do
  if ! "$agent" image ls --data-dir "$data/agent-$i" 2>/dev/null | grep -q "^$image "; then
    [ -f "$data/demo/busybox.tar" ] || deploy/build-busybox-image.sh "$data/demo/busybox.tar" "$image"
    "$gantry" down --keep --data-dir "$data" >/dev/null
    "$agent" image import --data-dir "$data/agent-$i" "$data/demo/busybox.tar"
  fi
done

"$gantry" up --nodes 2 --data-dir "$data"

cat >"$data/demo/web.yaml" <<'YAML'
kind: Service
name: web
replicas: 2
image: gantry.local/busybox:1
command: ["sh", "-c"]
args: ["mkdir -p /www && echo hello from $(hostname) > /www/index.html && exec httpd -f -p 80 -h /www"]
ports: [{container: 80, host: 8080}]
resources: {cpu: 250m, memory: 32Mi, pids: 64}
YAML
"$gantry" apply -f "$data/demo/web.yaml"

fetch() {
  if command -v curl >/dev/null; then curl -fsS "$1"; else busybox wget -qO- "$1"; fi
}
for host in "$net.11" "$net.12"; do
  for _ in $(seq 150); do fetch "http://$host:8080/" 2>/dev/null && break; sleep 0.2; done
  fetch "http://$host:8080/" >/dev/null || {
    echo "nothing answers on $host:8080; see $data/logs/" >&2
    exit 1
  }
done
echo
"$gantry" get instances -o wide
echo
echo "Use:   export GANTRY_ADDR=$GANTRY_ADDR PATH=$bin:\$PATH; gantry get nodes"
echo "Logs:  $data/logs/"
down_flags=""
[ "$data" = /var/lib/gantry ] || down_flags=" --data-dir $data"
echo "Stop:  $gantry down$down_flags   (deletes the workloads, stops the nodes, removes the hosts)"
