#!/usr/bin/env bash
# Quick start on a fresh Debian machine (as root): installs what Gantry needs, builds it, starts a
# single-machine cluster with `gantry up`, imports a busybox image built here from
# busybox-static (no registry needed), runs two busybox httpd Services on it — web-1 on port
# 8081 and web-2 on 8082, host network — and fetches their pages. Rerunnable: every step is
# skipped or repeated harmlessly. `gantry down` stops it all.
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

cargo build --release --workspace --bins
bin=$PWD/target/release
gantry=$bin/gantry
agent=$bin/gantry-agent
data=${GANTRY_DATA:-/var/lib/gantry}
image=gantry.local/busybox:1
export GANTRY_ADDR=http://127.0.0.1:7700

# The demo of earlier versions ran containers through `gantry-agent ctr` on ports 8080/8081.
if [ -d "$data/runtime/containers" ]; then
  "$agent" ctr --root "$data/runtime" rm --force demo-web-1 demo-web-2 >/dev/null 2>&1 || true
fi

# The image, built from /bin/busybox. The agent's image store belongs to the running agent, so
# an import happens while the agent is down (`down --keep` leaves containers running).
mkdir -p "$data/demo"
if ! "$agent" image ls --data-dir "$data/agent" | grep -q "^$image "; then
  deploy/build-busybox-image.sh "$data/demo/busybox.tar" "$image"
  "$gantry" down --keep --data-dir "$data"
  "$agent" image import --data-dir "$data/agent" "$data/demo/busybox.tar"
fi

"$gantry" up --data-dir "$data"

# Two Services of one replica each, on distinct ports: bridge networking (one port per
# container IP) is not wired into the agent yet, so both share the host network.
for i in 1 2; do
  port=$((8080 + i))
  cat >"$data/demo/web-$i.yaml" <<YAML
kind: Service
name: web-$i
image: $image
command: ["sh", "-c"]
args: ["mkdir -p /www && echo hello from web-$i on \$(hostname) > /www/index.html && exec httpd -f -p 127.0.0.1:$port -h /www"]
network: host
resources: {cpu: 250m, memory: 32Mi, pids: 64}
YAML
  "$gantry" apply -f "$data/demo/web-$i.yaml"
done

fetch() {
  if command -v curl >/dev/null; then curl -fsS "$1"; else busybox wget -qO- "$1"; fi
}
for port in 8081 8082; do
  for _ in $(seq 150); do fetch "http://127.0.0.1:$port/" 2>/dev/null && break; sleep 0.2; done
  fetch "http://127.0.0.1:$port/" >/dev/null || { echo "nothing answers on port $port; see $data/logs/agent.log" >&2; exit 1; }
done
echo
"$gantry" get instances
echo
echo "Logs:  $data/logs/{scheduler,agent}.log"
down_flags=""
[ "$data" = /var/lib/gantry ] || down_flags=" --data-dir $data"
echo "Stop:  $gantry down$down_flags   (deletes the workloads and stops their containers; --keep keeps them)"
