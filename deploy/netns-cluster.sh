#!/bin/sh
# Builds (or removes) a few "hosts" on one machine for trying Gantry's networking between nodes:
# each host is a network namespace with one interface on a bridge this script creates, so that
# host-gateway routes, published ports and inter-node traffic behave as between machines.
#
#   deploy/netns-cluster.sh up   PREFIX COUNT [NET]   hosts PREFIX-1 … PREFIX-COUNT
#   deploy/netns-cluster.sh down PREFIX COUNT
#
# NET is the first three octets of the hosts' /24 (default 172.31.250): the bridge, named
# PREFIX-br (at most 15 characters in all), gets NET.1 and host i gets NET.(10+i), with a
# default route via the bridge, so a scheduler listening on NET.1 is reachable from every host.
# Run an agent in host i with its own data dir and `--address NET.(10+i)`:
#
#   nsenter --net=/run/netns/PREFIX-1 gantry-agent run --name PREFIX-1 \
#       --address 172.31.250.11 --scheduler http://172.31.250.1:7700 --data-dir DIR
#
# `nsenter --net` rather than `ip netns exec`: the latter also gives the command a mount
# namespace with a fresh /sys, which hides the cgroup hierarchies the agent needs and keeps the
# agent's namespace mounts from other processes (live restore could not find them).
set -eu

usage() {
    echo "usage: $0 up|down PREFIX COUNT [NET]" >&2
    exit 2
}

[ $# -ge 3 ] || usage
action=$1
prefix=$2
count=$3
net=${4:-172.31.250}
bridge="$prefix-br"
case $count in
'' | *[!0-9]*) echo "$0: COUNT must be a number, got '$count'" >&2; exit 2 ;;
esac
if [ ${#bridge} -gt 15 ]; then
    echo "$0: PREFIX '$prefix' is too long: '$bridge' must fit in 15 characters" >&2
    exit 2
fi

up() {
    ip link add "$bridge" type bridge
    ip addr add "$net.1/24" dev "$bridge"
    ip link set "$bridge" up
    i=1
    while [ "$i" -le "$count" ]; do
        host="$prefix-$i"
        ip netns add "$host"
        ip link add "$prefix-v$i" type veth peer name eth0 netns "$host"
        ip link set "$prefix-v$i" master "$bridge" up
        ip -n "$host" link set lo up
        ip -n "$host" addr add "$net.$((10 + i))/24" dev eth0
        ip -n "$host" link set eth0 up
        ip -n "$host" route add default via "$net.1"
        # Each host routes between its containers and the other hosts.
        ip netns exec "$host" sysctl -qw net.ipv4.ip_forward=1
        i=$((i + 1))
    done
}

down() {
    i=1
    while [ "$i" -le "$count" ]; do
        ip netns del "$prefix-$i" 2>/dev/null || true
        ip link del "$prefix-v$i" 2>/dev/null || true
        i=$((i + 1))
    done
    ip link del "$bridge" 2>/dev/null || true
}

case $action in
up) up ;;
down) down ;;
*) usage ;;
esac
