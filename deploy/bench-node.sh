#!/usr/bin/env bash
# Node benchmarks (on demand, not part of the tests), on a single-machine cluster of its own
# (`gantry up` on a temp data dir and its own ports, so a running quick-start cluster is left
# alone):
#
#   1. 100 replicas of `sleep` on one node: time from `gantry apply` to all 100 Running.
#      Target ≤ 3 s.
#   2. `gantry run --rm IMAGE -- /bin/true` end to end (CLI → scheduler → agent → exit reported
#      → CLI exits with the code), p50 over RUNS runs; and `docker run --rm` of the same image
#      when a Docker daemon answers. Target ≤ 0.5× docker run.
#
#   deploy/bench-node.sh [replicas] [runs]      default: 100 50
#   NETWORK=host deploy/bench-node.sh          the replicas on the host network (no CNI)
#
# Needs root. Results go to stdout; BENCHMARKS.md records them.
set -euo pipefail
cd "$(dirname "$0")/.."
replicas=${1:-100}
runs=${2:-50}

cargo build --release --workspace --bins
bin=$PWD/target/release
gantry=$bin/gantry
agent=$bin/gantry-agent
image=gantry.bench/busybox:1
data=$(mktemp -d /var/tmp/gantry-bench.XXXXXX)
export GANTRY_ADDR=http://127.0.0.1:17700

cleanup() {
  "$gantry" down --data-dir "$data" >/dev/null 2>&1 || true
  rm -rf "$data"
}
trap cleanup EXIT

deploy/build-busybox-image.sh "$data/busybox.tar" "$image" >/dev/null
"$agent" image import --data-dir "$data/agent" "$data/busybox.tar" >/dev/null
"$gantry" up --data-dir "$data" --listen 127.0.0.1:17700 --metrics-listen 127.0.0.1:17701 >/dev/null

now_ms() { date +%s%3N; }

# 1. Replicas on one node.
cat >"$data/sleep.yaml" <<YAML
kind: Service
name: sleep
replicas: $replicas
image: $image
command: [sleep, "3600"]
network: ${NETWORK:-bridge}
stopGracePeriod: 1s
resources: {cpu: 10m, memory: 8Mi, pids: 8}
YAML
running() {
  "$gantry" get instances --workload sleep -o json |
    grep -cE '"state": *"(Running|Ready)"' || true
}
start=$(now_ms)
"$gantry" apply -f "$data/sleep.yaml" >/dev/null
until [ "$(running)" -ge "$replicas" ]; do
  [ $(($(now_ms) - start)) -lt 120000 ] || { echo "not all $replicas Running within 120 s" >&2; exit 1; }
  sleep 0.05
done
took=$(($(now_ms) - start))
echo "replicas: $replicas of sleep (network ${NETWORK:-bridge}) Running on one node in ${took} ms (target ≤ 3000 ms)"
"$gantry" delete workload sleep >/dev/null
until [ -z "$(ls "$data/agent/runtime/containers" 2>/dev/null)" ]; do
  sleep 0.2
done

# 2. `run --rm` of /bin/true, attached.
p50() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
if "$gantry" run --help | grep -q -- '--rm'; then
  for _ in $(seq "$runs"); do
    s=$(now_ms)
    "$gantry" run --rm "$image" -- /bin/true >/dev/null
    echo $(($(now_ms) - s))
  done >"$data/gantry-run.ms"
  gantry_p50=$(p50 <"$data/gantry-run.ms")
  echo "gantry run --rm /bin/true: p50 ${gantry_p50} ms over $runs runs"
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    docker load -i "$data/busybox.tar" >/dev/null
    for _ in $(seq "$runs"); do
      s=$(now_ms)
      docker run --rm "$image" /bin/true >/dev/null
      echo $(($(now_ms) - s))
    done >"$data/docker-run.ms"
    docker_p50=$(p50 <"$data/docker-run.ms")
    echo "docker run --rm /bin/true: p50 ${docker_p50} ms over $runs runs"
    echo "ratio gantry/docker: $(awk -v g="$gantry_p50" -v d="$docker_p50" 'BEGIN { printf "%.2f", g / d }') (target ≤ 0.50)"
  else
    echo "docker run: no Docker daemon answers here; ratio not measured"
  fi
else
  echo "gantry run --rm: this build has no attached run"
fi
