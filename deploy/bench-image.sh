#!/usr/bin/env bash
# Image pull benchmark (on demand, not part of the tests): pull + unpack of a ~100 MiB image of
# LAYERS layers from a loopback registry (Debian's docker-registry), by
#   gantry:        gantry-agent image pull (into a fresh image store: download, verify, unpack)
#   skopeo+umoci:  skopeo copy docker://… oci:…  then  umoci unpack
# each RUNS times on the same image in the same run, alternating; prints the medians (wall and
# CPU time) and the ratios.
#
#   deploy/bench-image.sh [layers] [runs]      default: 4 5
#
# Needs root (umoci unpack and the agent's unpacker keep owners). Installs docker-registry,
# skopeo and umoci when missing. Results go to stdout; BENCHMARKS.md records them.
set -euo pipefail
cd "$(dirname "$0")/.."
layers=${1:-4}
runs=${2:-5}
files_per_layer=2500 # × 10 KiB of random bytes: ~25 MiB per layer, gzip can't shrink it

need=(docker-registry skopeo umoci)
missing=()
for p in "${need[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if [ -z "${AGENT:-}" ]; then # AGENT=path/to/gantry-agent skips the release build
  cargo build --release -p gantry-agent
fi
agent=${AGENT:-$PWD/target/release/gantry-agent}

work=$(mktemp -d /var/tmp/gantry-bench-image.XXXXXX)
registry_pid=
cleanup() {
  [ -z "$registry_pid" ] || kill "$registry_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# The image, as an OCI layout: LAYERS gzip layers of many small files, a config, a manifest.
layout=$work/layout
mkdir -p "$layout/blobs/sha256"
printf '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"
blob() { # FILE → moves it into the layout, prints its digest hex
  local hex
  hex=$(sha256sum "$1" | cut -d' ' -f1)
  mv "$1" "$layout/blobs/sha256/$hex"
  echo "$hex"
}
layer_descs=()
diff_ids=()
for l in $(seq "$layers"); do
  dir=$work/src/layer$l/data$l
  mkdir -p "$dir"
  for f in $(seq "$files_per_layer"); do
    head -c 10240 /dev/urandom >"$dir/f$f"
  done
  tar -C "$work/src/layer$l" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -cf "$work/layer.tar" "data$l"
  diff_ids+=("\"sha256:$(sha256sum "$work/layer.tar" | cut -d' ' -f1)\"")
  gzip -1 -n "$work/layer.tar"
  size=$(stat -c %s "$work/layer.tar.gz")
  hex=$(blob "$work/layer.tar.gz")
  layer_descs+=("{\"mediaType\":\"application/vnd.oci.image.layer.v1.tar+gzip\",\"digest\":\"sha256:$hex\",\"size\":$size}")
done
# The layers' source files stay until the end: this machine's ext4 has no journal, and there
# the inode allocator skips (slowly) inodes deleted in the last ~30 s, which would tax the first
# runs. For the same reason every run writes into a directory of its own, deleted at the end.
arch=$(uname -m)
case $arch in x86_64) arch=amd64 ;; aarch64) arch=arm64 ;; esac
join() { local IFS=,; echo "$*"; }
printf '{"architecture":"%s","os":"linux","config":{"Cmd":["sh"]},"rootfs":{"type":"layers","diff_ids":[%s]}}' \
  "$arch" "$(join "${diff_ids[@]}")" >"$work/config.json"
config_size=$(stat -c %s "$work/config.json")
config=$(blob "$work/config.json")
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[%s]}' \
  "$config" "$config_size" "$(join "${layer_descs[@]}")" >"$work/manifest.json"
manifest_size=$(stat -c %s "$work/manifest.json")
manifest=$(blob "$work/manifest.json")
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"1"}}]}' \
  "$manifest" "$manifest_size" >"$layout/index.json"
total=$(du -sb "$layout/blobs" | cut -f1)

# A loopback registry holding it.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$work/registry.yml" <<YAML
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $work/registry}}
http: {addr: 127.0.0.1:$port}
YAML
docker-registry serve "$work/registry.yml" 2>"$work/registry.log" &
registry_pid=$!
for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
ref=127.0.0.1:$port/bench/big:1
HOME=$work skopeo --insecure-policy copy --quiet --dest-tls-verify=false --preserve-digests \
  "oci:$layout:1" "docker://$ref"
echo "image: $layers layers, $((total / 1048576)) MiB compressed, $((layers * files_per_layer)) files"

# The two alternate run by run, so load from other work on the machine falls on both alike.
# Wall time is what a user waits; user+sys CPU time is steadier on a busy machine.
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
TIMEFORMAT='%R %U %S' # bash's `time`: wall, user and sys seconds, children included
timed() { # FILE CMD... → appends "wall_ms cpu_ms" to FILE
  local t
  t=$({ time "${@:2}" >/dev/null; } 2>&1 | tail -1)
  awk -v t="$t" 'BEGIN { split(t, a, " "); printf "%d %d\n", a[1] * 1000, (a[2] + a[3]) * 1000 }' >>"$1"
}
gantry_pull() { "$agent" image pull --data-dir "$1/gantry" "$ref"; } # RUN_DIR
peer_pull() { # RUN_DIR
  HOME=$work skopeo --insecure-policy copy --quiet --src-tls-verify=false "docker://$ref" "oci:$1/oci:1" &&
    umoci --log error unpack --image "$1/oci:1" "$1/bundle"
}
: >"$work/gantry.ms"
: >"$work/peer.ms"
for i in $(seq "$runs"); do
  run=$work/run$i
  sync
  timed "$work/gantry.ms" gantry_pull "$run"
  sync
  timed "$work/peer.ms" peer_pull "$run"
done
g=$(cut -d' ' -f1 "$work/gantry.ms" | median)
p=$(cut -d' ' -f1 "$work/peer.ms" | median)
gc=$(cut -d' ' -f2 "$work/gantry.ms" | median)
pc=$(cut -d' ' -f2 "$work/peer.ms" | median)
echo "gantry-agent image pull:    median ${g} ms wall, ${gc} ms CPU over $runs runs (wall: $(cut -d' ' -f1 "$work/gantry.ms" | tr '\n' ' ')ms)"
echo "skopeo copy + umoci unpack: median ${p} ms wall, ${pc} ms CPU over $runs runs (wall: $(cut -d' ' -f1 "$work/peer.ms" | tr '\n' ' ')ms)"
echo "ratio gantry/peer: wall $(awk -v g="$g" -v p="$p" 'BEGIN { printf "%.2f", g / p }'), CPU $(awk -v g="$gc" -v p="$pc" 'BEGIN { printf "%.2f", g / p }') (target < 1)"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)"
