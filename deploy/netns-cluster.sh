#!/usr/bin/env bash
# A local edgemoe cluster on one machine: network namespaces on a private bridge.
#
#   deploy/netns-cluster.sh up N [--rate RATE]   # N node namespaces + a coordinator namespace
#   deploy/netns-cluster.sh status
#   deploy/netns-cluster.sh down                 # stops what runs in them, deletes them
#
# Every address lives inside a namespace, and the bridge sits in a hub namespace
# of its own: nothing is added to this machine's real interfaces, so mDNS and
# node traffic never leave the namespaces. --rate limits each link with `tc tbf`
# (e.g. 1gbit, 300mbit); this kernel has no netem, so added delay comes from a
# relay (tests/netns.py relay), not from tc.
#
# Needs root and iproute2. EDGEMOE_NETNS_PREFIX (default "edgemoe-") names the
# namespaces: <prefix>hub, <prefix>coord, <prefix>node1..N.
set -euo pipefail

PREFIX="${EDGEMOE_NETNS_PREFIX:-edgemoe-}"
SUBNET="${EDGEMOE_NETNS_SUBNET:-10.213.1}"
HUB="${PREFIX}hub"
COORD="${PREFIX}coord"
COORD_ADDR="${SUBNET}.1"
NODE_PORT=50051

die() { echo "netns-cluster: $*" >&2; exit 1; }

usage() {
    sed -n '4,6p' "$0" | sed 's/^# *//' >&2
    exit 2
}

node_addr() { echo "${SUBNET}.$(( $1 + 10 ))"; }

ns_exists() { ip netns list | awk '{print $1}' | grep -qx -- "$1"; }

our_namespaces() {
    ip netns list | awk '{print $1}' | grep -E -- "^${PREFIX}(hub|coord|node[0-9]+)$" || true
}

check_tools() {
    command -v ip >/dev/null || die "the ip command (iproute2) is not installed"
    [ "$(id -u)" -eq 0 ] || die "network namespaces need root: run it with sudo"
}

# A host namespace with lo up, joined to the hub's bridge by a veth pair that is
# created directly inside the two namespaces (never in the root one).
add_host() {
    local ns="$1" port="$2" addr="$3"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    ip -n "$HUB" link add "$port" type veth peer name eth0 netns "$ns"
    ip -n "$HUB" link set "$port" master br0 up
    ip -n "$ns" addr add "${addr}/24" dev eth0
    ip -n "$ns" link set eth0 up
    if [ -n "$RATE" ]; then
        ip netns exec "$ns" tc qdisc add dev eth0 root tbf rate "$RATE" burst 256kb latency 50ms
    fi
}

cmd_up() {
    local n="${1:-}"
    shift || true
    RATE=""
    while [ $# -gt 0 ]; do
        case "$1" in
            --rate) RATE="${2:?--rate needs a value, e.g. 1gbit}"; shift 2 ;;
            *) usage ;;
        esac
    done
    [[ "$n" =~ ^[0-9]+$ ]] && [ "$n" -ge 1 ] && [ "$n" -le 200 ] || die "give the number of nodes, 1 to 200: $0 up N"
    check_tools
    [ -n "$RATE" ] && { command -v tc >/dev/null || die "--rate needs tc (iproute2)"; }
    [ -z "$(our_namespaces)" ] || die "a cluster is already up ($(our_namespaces | tr '\n' ' ')); run '$0 down' first"

    trap 'echo "netns-cluster: setup failed, removing what was made" >&2; cmd_down >/dev/null' ERR
    ip netns add "$HUB"
    ip -n "$HUB" link set lo up
    ip -n "$HUB" link add br0 type bridge
    ip -n "$HUB" link set br0 up
    add_host "$COORD" p0 "$COORD_ADDR"
    for k in $(seq 1 "$n"); do
        add_host "${PREFIX}node${k}" "p${k}" "$(node_addr "$k")"
    done
    trap - ERR

    local edge_node edgemoe
    edge_node="$(command -v edge-node || echo .venv/bin/edge-node)"
    edgemoe="$(command -v edgemoe || echo .venv/bin/edgemoe)"
    echo "cluster up: coordinator namespace ${COORD} (${COORD_ADDR}), ${n} node namespace(s) on ${SUBNET}.0/24${RATE:+, links limited to $RATE}"
    echo
    echo "1. make the cluster's credentials (prints the join token last):"
    echo "     ip netns exec ${COORD} ${edgemoe} cluster init"
    echo "2. start a node in each namespace (one terminal each, or append '&'):"
    for k in $(seq 1 "$n"); do
        local addr
        addr="$(node_addr "$k")"
        echo "     ip netns exec ${PREFIX}node${k} ${edge_node} --join TOKEN --interface ${addr} --listen ${addr}:${NODE_PORT} --name node${k} --data-dir /tmp/${PREFIX}node${k}"
    done
    echo "3. use them from the coordinator namespace:"
    echo "     ip netns exec ${COORD} ${edgemoe} peers"
    echo "     ip netns exec ${COORD} ${edgemoe} generate --model DST --prompt 'Hello' --peers auto"
    echo "   or by address: --peers $(node_addr 1):${NODE_PORT}"
    echo
    echo "stop everything: $0 down"
}

cmd_down() {
    local ns pids
    for ns in $(our_namespaces); do
        pids="$(ip netns pids "$ns" 2>/dev/null || true)"
        [ -z "$pids" ] || kill $pids 2>/dev/null || true
    done
    # Give processes a moment to withdraw their advertisements, then make sure.
    for _ in 1 2 3 4 5 6 7 8 9 10; do
        pids=""
        for ns in $(our_namespaces); do pids="$pids $(ip netns pids "$ns" 2>/dev/null || true)"; done
        [ -z "${pids// /}" ] && break
        sleep 0.2
    done
    for ns in $(our_namespaces); do
        pids="$(ip netns pids "$ns" 2>/dev/null || true)"
        [ -z "$pids" ] || kill -9 $pids 2>/dev/null || true
        ip netns del "$ns"
    done
    echo "cluster down"
}

cmd_status() {
    local ns
    local found
    found="$(our_namespaces)"
    [ -n "$found" ] || { echo "no cluster is up"; return 0; }
    for ns in $found; do
        printf '%-24s %-16s %s processes\n' "$ns" \
            "$(ip -n "$ns" -4 -o addr show dev eth0 2>/dev/null | awk '{print $4}' | head -1)" \
            "$(ip netns pids "$ns" 2>/dev/null | wc -l)"
    done
}

case "${1:-}" in
    up) shift; cmd_up "$@" ;;
    down) check_tools; cmd_down ;;
    status) check_tools; cmd_status ;;
    *) usage ;;
esac
