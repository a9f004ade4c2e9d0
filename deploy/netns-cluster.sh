#!/usr/bin/env bash
# A local edgemoe cluster on one machine: a coordinator and N edge nodes, each in a
# network namespace of its own on a private bridge.
#
#   deploy/netns-cluster.sh up N [--model DST] [--port 8080] [--cache-mb MB]
#                                [--node-cache-mb MB] [--rate RATE]
#   deploy/netns-cluster.sh status
#   deploy/netns-cluster.sh down [--purge]
#
# up: makes the namespaces (<prefix>hub holding the bridge, <prefix>coord at
#   SUBNET.1, <prefix>node1..N at SUBNET.11..), makes the cluster's token
#   (`edgemoe cluster init --dir STATE/cluster`, reused if an earlier `up` made
#   one), starts `edge-node` in each node namespace (listening on ADDR:50051,
#   advertising over mDNS on ADDR only, the token passed in EDGEMOE_JOIN_TOKEN,
#   never on the command line) and waits until each listens. With --model DST it
#   also starts `edgemoe serve` in the coordinator namespace on SUBNET.1:PORT,
#   using the nodes by address (--peers, so what runs where is deterministic) and
#   the token above (EDGEMOE_HOME=STATE), and waits until GET /health answers.
#   It then prints what runs where and the commands to use it. If anything fails
#   it says so in one line, stops what it started and deletes the namespaces.
#   --cache-mb is the coordinator's expert cache (`edgemoe serve --cache-mb`; a
#   small one leaves more of the experts to the nodes), --node-cache-mb each
#   node's (default 512). --rate limits each link with `tc tbf` (e.g. 1gbit,
#   300mbit); this kernel has no netem, so added delay comes from a relay
#   (tests/netns.py relay), not from tc.
# status: each namespace, its address, what runs in it, and whether each node
#   and the coordinator still runs (exit 1 if one that was started has exited).
# down: SIGTERM to every process in the namespaces, SIGKILL to what is left after
#   10 s, deletes the namespaces and the pid files. Logs, node data dirs (the
#   experts pushed to them) and the token stay in STATE; --purge deletes them too
#   (only what `up` made; STATE itself if that leaves it empty). Safe to run at
#   any time, also after a failed or interrupted `up`.
#
# Every address lives inside a namespace and the bridge in a hub namespace of its
# own: nothing is added to this machine's real interfaces, so mDNS and node
# traffic never leave the namespaces.
#
# Needs root, iproute2 (and tc for --rate); curl or python3 for the health check.
# Environment:
#   EDGEMOE_NETNS_PREFIX   names of the namespaces (default "edgemoe-")
#   EDGEMOE_NETNS_SUBNET   first three octets of their /24 (default 10.213.1)
#   EDGEMOE_NETNS_STATE    pid files, logs, node data dirs, the cluster token
#                          (default /run/<prefix>netns, e.g. /run/edgemoe-netns;
#                          /run is in RAM: for a large model, whose experts the
#                          nodes keep in their data dirs, point it at a disk)
#   EDGEMOE_NETNS_TIMEOUT  seconds to wait for all nodes to listen, then again for the
#                          coordinator to answer (120)
#   EDGEMOE_BIN_DIR        where edgemoe and edge-node are (default: the ones on
#                          PATH, else the .venv/bin of the repo holding this script)
set -euo pipefail

SOURCE="${BASH_SOURCE[0]:-$0}"
case "$SOURCE" in
    */*) SCRIPT_DIR="$(cd "${SOURCE%/*}" && pwd -P)" ;;
    *) SCRIPT_DIR="$(pwd -P)" ;;
esac
REPO_DIR="${SCRIPT_DIR%/*}"
SELF="$0"

PREFIX="${EDGEMOE_NETNS_PREFIX:-edgemoe-}"
SUBNET="${EDGEMOE_NETNS_SUBNET:-10.213.1}"
STATE="${EDGEMOE_NETNS_STATE:-/run/${PREFIX}netns}"
TIMEOUT="${EDGEMOE_NETNS_TIMEOUT:-120}"
HUB="${PREFIX}hub"
COORD="${PREFIX}coord"
COORD_ADDR="${SUBNET}.1"
NODE_PORT=50051
MAX_NODES=200

DIED=0
die() {
    DIED=1
    echo "netns-cluster: $*" >&2
    exit 1
}

usage() {
    cat <<EOF
usage: $SELF up N [--model DST] [--port PORT] [--cache-mb MB] [--node-cache-mb MB] [--rate RATE]
       $SELF status
       $SELF down [--purge]
A coordinator and N edge nodes in network namespaces (${PREFIX}coord, ${PREFIX}node1..N) on ${SUBNET}.0/24;
state and logs in ${STATE}. The comment at the top of this script says more.
EOF
}

check_settings() {
    [[ "$PREFIX" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$ ]] \
        || die "EDGEMOE_NETNS_PREFIX='$PREFIX' must be 1 to 32 letters, digits, '_', '.' or '-'"
    local ok=0 octet
    if [[ "$SUBNET" =~ ^([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]]; then
        ok=1
        for octet in "${BASH_REMATCH[@]:1}"; do
            [ "$((10#$octet))" -le 255 ] || ok=0
        done
    fi
    [ "$ok" -eq 1 ] || die "EDGEMOE_NETNS_SUBNET='$SUBNET' must be three octets, e.g. 10.213.1"
    if ! [[ "$TIMEOUT" =~ ^[0-9]+$ ]] || [ "$((10#$TIMEOUT))" -lt 1 ]; then
        die "EDGEMOE_NETNS_TIMEOUT='$TIMEOUT' must be a whole number of seconds"
    fi
    TIMEOUT=$((10#$TIMEOUT))
    case "$STATE" in
        /*) ;;
        *) STATE="$(pwd -P)/$STATE" ;;
    esac
}

check_tools() {
    # Builtins only up to here: these checks must work with an empty PATH.
    command -v ip >/dev/null 2>&1 || die "the ip command (iproute2) is not installed"
    [ "${EUID:-$(id -u)}" -eq 0 ] || die "network namespaces need root: run it with sudo"
}

node_addr() { echo "${SUBNET}.$(($1 + 10))"; }

# Our namespaces: <prefix>hub, <prefix>coord and <prefix>nodeK, nothing else.
our_namespaces() {
    local name rest
    while read -r name rest; do
        [ -n "$name" ] || continue
        case "$name" in
            "$HUB" | "$COORD") echo "$name" ;;
            "${PREFIX}node"*)
                if [[ "${name#"${PREFIX}node"}" =~ ^[0-9]+$ ]]; then echo "$name"; fi
                ;;
        esac
    done < <(ip netns list 2>/dev/null || true)
    return 0
}

# The node namespaces' numbers, in order.
node_numbers() {
    local ns
    for ns in $(our_namespaces); do
        case "$ns" in "${PREFIX}node"*) echo "${ns#"${PREFIX}node"}" ;; esac
    done | sort -n
}

# Whether process $1 has exited (a zombie has: only its parent's wait is missing).
gone() {
    local stat
    stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
    stat="${stat##*) }"
    [ "${stat%% *}" = Z ]
}

# Waits up to $1 x 0.2 s for the pids that follow to end; prints those still running.
still_running_after() {
    local tries="$1" left="" pid
    shift
    for _ in $(seq 1 "$tries"); do
        left=""
        for pid in "$@"; do
            gone "$pid" || left+=" $pid"
        done
        [ -n "$left" ] || break
        sleep 0.2
    done
    echo "$left"
}

# Whether process $1 runs (and is no zombie) inside namespace $2.
pid_alive_in() {
    [[ "$1" =~ ^[0-9]+$ ]] && ! gone "$1" && [ "$(ip netns identify "$1" 2>/dev/null)" = "$2" ]
}

# The pid in pid file $1 if that process runs inside namespace $2.
running_pid() {
    local pid
    [ -f "$1" ] || return 1
    pid="$(cat "$1" 2>/dev/null)" || return 1
    pid_alive_in "$pid" "$2" || return 1
    echo "$pid"
}

# The state dir is root's: refuse one that someone else could have prepared.
prepare_state() {
    if [ -L "$STATE" ] || { [ -e "$STATE" ] && [ ! -d "$STATE" ]; }; then
        die "$STATE (EDGEMOE_NETNS_STATE) is not a directory"
    fi
    if [ -d "$STATE" ]; then
        local owner mode
        read -r owner mode < <(stat -c '%u %a' "$STATE")
        [ "$owner" -eq 0 ] || die "$STATE (EDGEMOE_NETNS_STATE) is not owned by root; remove it or pick another"
        [ $((8#$mode & 8#022)) -eq 0 ] \
            || die "$STATE (EDGEMOE_NETNS_STATE) can be written by other users (mode $mode); run 'chmod 700 $STATE'"
    else
        { mkdir -p -- "$STATE" && chmod 700 "$STATE"; } || die "cannot make the state dir $STATE (EDGEMOE_NETNS_STATE)"
    fi
}

find_bins() {
    local name path
    for name in edgemoe edge-node; do
        if [ -n "${EDGEMOE_BIN_DIR:-}" ]; then
            path="${EDGEMOE_BIN_DIR%/}/$name"
        else
            path="$(command -v "$name" 2>/dev/null || true)"
            [ -n "$path" ] || path="$REPO_DIR/.venv/bin/$name"
        fi
        [ -x "$path" ] || die "cannot find $name (looked in ${EDGEMOE_BIN_DIR:-PATH and $REPO_DIR/.venv/bin}): install edgemoe (make setup) or set EDGEMOE_BIN_DIR"
        case "$name" in
            edgemoe) EDGEMOE="$path" ;;
            edge-node) EDGE_NODE="$path" ;;
        esac
    done
}

positive_mb() { [[ "$2" =~ ^[0-9]*\.?[0-9]+$ && "$2" =~ [1-9] ]] || die "$1 '$2' must be a positive number of MiB"; }

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

# Starts a command in namespace $1, detached, stdout+stderr to $3. The process
# writes its own pid to $2 before it execs the command, so the pid file holds
# the command's pid whatever setsid and ip do.
start_in() {
    local ns="$1" pidfile="$2" log="$3"
    shift 3
    rm -f "$pidfile"
    # shellcheck disable=SC2016  # $$ and $@ are the inner shell's
    setsid ip netns exec "$ns" /bin/sh -c 'echo $$ > "$0"; exec "$@"' "$pidfile" "$@" \
        </dev/null >"$log" 2>&1 &
}

last_line() { grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -n 1 | cut -c1-300; }

wait_for_node() {
    local k="$1" deadline="$2" log="$STATE/node$1.log" pidfile="$STATE/node$1.pid" ns="${PREFIX}node$1"
    local pid
    while ! grep -q '^edge-node .* listening on ' "$log" 2>/dev/null; do
        if [ -f "$pidfile" ]; then
            pid="$(cat "$pidfile" 2>/dev/null || true)"
            if [ -n "$pid" ] && ! pid_alive_in "$pid" "$ns"; then
                sleep 0.2
                grep -q '^edge-node .* listening on ' "$log" 2>/dev/null && return 0
                die "node$k exited before listening: $(last_line "$log") (log: $log)"
            fi
        fi
        [ "$SECONDS" -lt "$deadline" ] \
            || die "node$k did not listen within ${TIMEOUT}s (EDGEMOE_NETNS_TIMEOUT); last line of its log $log: $(last_line "$log")"
        sleep 0.2
    done
}

http_ok() {
    if command -v curl >/dev/null 2>&1; then
        ip netns exec "$COORD" curl -fsS --noproxy '*' --max-time 5 -o /dev/null "$1" >/dev/null 2>&1
    else
        ip netns exec "$COORD" python3 -c 'import sys, urllib.request as u
u.build_opener(u.ProxyHandler({})).open(sys.argv[1], timeout=5).read()' "$1" >/dev/null 2>&1
    fi
}

wait_for_coordinator() {
    local deadline="$1" url="http://${COORD_ADDR}:${PORT}/health" log="$STATE/coordinator.log"
    local pidfile="$STATE/coordinator.pid" pid
    until http_ok "$url"; do
        if [ -f "$pidfile" ]; then
            pid="$(cat "$pidfile" 2>/dev/null || true)"
            if [ -n "$pid" ] && ! pid_alive_in "$pid" "$COORD"; then
                die "the coordinator exited: $(last_line "$log") (log: $log)"
            fi
        fi
        [ "$SECONDS" -lt "$deadline" ] \
            || die "the coordinator did not answer $url within ${TIMEOUT}s (EDGEMOE_NETNS_TIMEOUT); last line of its log $log: $(last_line "$log")"
        sleep 0.5
    done
}

# Run on any exit of `up` before it completed: stop what was started, delete the namespaces.
abort_up() {
    local rc=$?
    set +e
    trap - EXIT INT TERM HUP
    [ "$rc" -ne 0 ] || rc=1
    if [ "$DIED" -ne 1 ]; then
        case "$rc" in
            129 | 130 | 143) echo "netns-cluster: interrupted; removed what was made" >&2 ;;
            *) echo "netns-cluster: setting up the cluster failed (exit $rc); removed what was made" >&2 ;;
        esac
    fi
    cmd_down quiet >/dev/null 2>&1
    exit "$rc"
}

q() {
    if [[ "$1" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then printf '%s' "$1"; else printf '%q' "$1"; fi
}

# Its arguments, each quoted for a shell, on one line.
qcmd() {
    local out="" a
    for a in "$@"; do out+="${out:+ }$(q "$a")"; done
    echo "$out"
}

# The command line of node $1 (its token comes from EDGEMOE_JOIN_TOKEN) and of the coordinator.
node_argv() {
    local addr
    addr="$(node_addr "$1")"
    NODE_ARGV=("$EDGE_NODE" --listen "$addr:$NODE_PORT" --interface "$addr" --name "node$1"
        --data-dir "$STATE/node$1" --cache-mb "$NODE_CACHE_MB")
}
serve_argv() {
    SERVE_ARGV=("$EDGEMOE" serve --model "$1" --host "$COORD_ADDR" --port "$PORT" --peers "$2")
    [ -z "$CACHE_MB" ] || SERVE_ARGV+=(--cache-mb "$CACHE_MB")
}

# The env knobs that differ from their defaults, for the commands printed.
knobs() {
    local out=""
    [ "$PREFIX" = "edgemoe-" ] || out+="EDGEMOE_NETNS_PREFIX=$(q "$PREFIX") "
    [ "$SUBNET" = "10.213.1" ] || out+="EDGEMOE_NETNS_SUBNET=$SUBNET "
    [ "$STATE" = "/run/${PREFIX}netns" ] || out+="EDGEMOE_NETNS_STATE=$(q "$STATE") "
    echo "$out"
}

cmd_up() {
    local n="${1:-}"
    [ $# -eq 0 ] || shift
    if ! [[ "$n" =~ ^[0-9]{1,3}$ ]] || [ "$((10#$n))" -lt 1 ] || [ "$((10#$n))" -gt "$MAX_NODES" ]; then
        die "give the number of nodes, 1 to $MAX_NODES: $SELF up N [--model DST]"
    fi
    n=$((10#$n))
    RATE="" MODEL="" PORT=8080 CACHE_MB="" NODE_CACHE_MB=512
    while [ $# -gt 0 ]; do
        case "$1" in
            --rate | --model | --port | --cache-mb | --node-cache-mb)
                if [ $# -lt 2 ] || [ -z "$2" ]; then die "$1 needs a value"; fi
                case "$1" in
                    --rate) RATE="$2" ;;
                    --model) MODEL="$2" ;;
                    --port) PORT="$2" ;;
                    --cache-mb) CACHE_MB="$2" ;;
                    --node-cache-mb) NODE_CACHE_MB="$2" ;;
                esac
                shift 2
                ;;
            *) die "unknown option '$1' for up; see $SELF --help" ;;
        esac
    done
    if ! [[ "$PORT" =~ ^[0-9]{1,5}$ ]] || [ "$((10#$PORT))" -lt 1 ] || [ "$((10#$PORT))" -gt 65535 ]; then
        die "--port '$PORT' must be a port number, 1 to 65535"
    fi
    PORT=$((10#$PORT))
    [ -z "$CACHE_MB" ] || positive_mb --cache-mb "$CACHE_MB"
    positive_mb --node-cache-mb "$NODE_CACHE_MB"
    [[ -z "$RATE" || "$RATE" =~ ^[0-9]+(\.[0-9]+)?[A-Za-z]*$ ]] || die "--rate '$RATE' is not a rate, e.g. 1gbit or 300mbit"
    check_settings
    check_tools
    if [ -n "$MODEL" ]; then
        [ -d "$MODEL" ] || die "--model $MODEL: no such directory; pack it first with edgemoe pack SRC $MODEL"
        MODEL="$(cd "$MODEL" && pwd -P)"
        [ -f "$MODEL/manifest.json" ] \
            || die "--model $MODEL holds no manifest.json, so it is no packed model; pack it first with edgemoe pack SRC DST"
    fi
    [ -z "$RATE" ] || command -v tc >/dev/null 2>&1 || die "--rate needs tc (iproute2)"
    command -v setsid >/dev/null 2>&1 || die "setsid (util-linux) is not installed"
    local up_already
    up_already="$(our_namespaces | sort | tr '\n' ' ')"
    [ -z "$up_already" ] || die "a cluster is already up (${up_already% }); run '$(knobs)$SELF down' first"
    find_bins
    prepare_state

    # From here on, any failure or interruption removes what was made.
    trap abort_up EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    trap 'exit 129' HUP

    ip netns add "$HUB"
    ip -n "$HUB" link set lo up
    ip -n "$HUB" link add br0 type bridge
    ip -n "$HUB" link set br0 up
    add_host "$COORD" p0 "$COORD_ADDR"
    local k peers=""
    for k in $(seq 1 "$n"); do
        add_host "${PREFIX}node${k}" "p${k}" "$(node_addr "$k")"
        peers+="${peers:+,}$(node_addr "$k"):${NODE_PORT}"
    done
    printf 'nodes=%s\nport=%s\nmodel=%s\npeers=%s\n' "$n" "$PORT" "$MODEL" "$peers" >"$STATE/cluster.env"

    # The cluster's token: made once, reused by later `up`s (the nodes' data dirs keep their experts).
    local token_file="$STATE/cluster/join-token" out
    if [ ! -f "$token_file" ]; then
        # Its output ends with the token: kept out of every log.
        out="$("$EDGEMOE" cluster init --dir "$STATE/cluster" 2>&1)" \
            || die "edgemoe cluster init failed: $(echo "$out" | tail -n 1)"
    fi
    local token
    token="$(tail -n 1 "$token_file")"
    [ -n "$token" ] || die "$token_file holds no token; delete it and run up again"

    local deadline=$((SECONDS + TIMEOUT))
    for k in $(seq 1 "$n"); do
        [ -d "$STATE/node$k" ] || mkdir -m 700 "$STATE/node$k"
        node_argv "$k"
        EDGEMOE_JOIN_TOKEN="$token" start_in "${PREFIX}node$k" "$STATE/node$k.pid" "$STATE/node$k.log" "${NODE_ARGV[@]}"
    done
    for k in $(seq 1 "$n"); do
        wait_for_node "$k" "$deadline"
    done

    if [ -n "$MODEL" ]; then
        serve_argv "$MODEL" "$peers"
        EDGEMOE_HOME="$STATE" start_in "$COORD" "$STATE/coordinator.pid" "$STATE/coordinator.log" "${SERVE_ARGV[@]}"
        wait_for_coordinator $((SECONDS + TIMEOUT))
    fi
    trap - EXIT INT TERM HUP
    print_summary "$n" "$peers"
}

print_summary() {
    local n="$1" peers="$2" k pid run
    local e="ip netns exec $COORD"
    local home em
    home="env EDGEMOE_HOME=$(q "$STATE")"
    em="$(q "$EDGEMOE")"
    run="$(knobs)$(q "$SELF")"
    echo "cluster up on ${SUBNET}.0/24${RATE:+, links limited to $RATE}; pid files, logs and data in $STATE"
    if [ -n "$MODEL" ]; then
        pid="$(cat "$STATE/coordinator.pid")"
        printf '  %-18s %-14s coordinator: edgemoe serve %s at http://%s:%s/v1 (pid %s, log %s)\n' \
            "$COORD" "$COORD_ADDR" "$MODEL" "$COORD_ADDR" "$PORT" "$pid" "$STATE/coordinator.log"
    else
        printf '  %-18s %-14s coordinator: nothing started (no --model)\n' "$COORD" "$COORD_ADDR"
    fi
    for k in $(seq 1 "$n"); do
        pid="$(cat "$STATE/node$k.pid")"
        printf '  %-18s %-14s edge-node node%s on %s:%s (pid %s, log %s)\n' \
            "${PREFIX}node$k" "$(node_addr "$k")" "$k" "$(node_addr "$k")" "$NODE_PORT" "$pid" "$STATE/node$k.log"
    done
    echo
    echo "the commands they run (to start one again after it stopped, add ' &'; the token stays off the command line;"
    echo "status then lists it among the namespace's processes, not as the pid it recorded):"
    if [ -n "$MODEL" ]; then
        serve_argv "$MODEL" "$peers"
        echo "  $e $home $(qcmd "${SERVE_ARGV[@]}")"
    fi
    for k in $(seq 1 "$n"); do
        node_argv "$k"
        echo "  EDGEMOE_JOIN_TOKEN=\"\$(tail -n 1 $(q "$STATE/cluster/join-token"))\" ip netns exec ${PREFIX}node$k $(qcmd "${NODE_ARGV[@]}")"
    done
    echo
    local model="DST" url="http://${COORD_ADDR}:${PORT}"
    local auth=""
    [ -z "${EDGEMOE_API_KEY:-}" ] || auth=" -H \"Authorization: Bearer \$EDGEMOE_API_KEY\""
    if [ -n "$MODEL" ]; then
        model="$(q "$MODEL")"
        echo "use it from the coordinator namespace:"
        echo "  $e curl -s$auth $url/v1/models"
        echo "  $e curl -s$auth $url/v1/completions -H 'Content-Type: application/json' -d '{\"model\": \"${MODEL##*/}\", \"prompt\": \"Hello\", \"max_tokens\": 32}'"
        echo "  $e curl -s$auth $url/metrics"
    else
        echo "start a coordinator in its namespace (the nodes already have the cluster's token):"
        serve_argv DST "$peers"
        echo "  $e $home $(qcmd "${SERVE_ARGV[@]}")"
        echo "  $e $home $em generate --model DST --prompt 'Hello' --peers $peers"
    fi
    echo "  $e $home $em peers --peers $peers"
    echo "  $e $home $em status --peers $peers"
    echo "  $e $home $em chat --model $model --peers $peers"
    echo "  (mDNS works between the namespaces too: --peers auto --interface $COORD_ADDR)"
    echo
    echo "what runs where: $run status"
    echo "stop everything: $run down    (--purge: delete the logs and node data too)"
}

cmd_down() {
    local quiet="${1:-}" ns pid namespaces pids="" left=""
    namespaces="$(our_namespaces)"
    for ns in $namespaces; do
        for pid in $(ip netns pids "$ns" 2>/dev/null); do
            pids+="${pids:+ }$pid"
        done
    done
    if [ -n "$pids" ]; then
        # shellcheck disable=SC2086  # one argument per pid
        kill -TERM $pids 2>/dev/null || true
        # Give processes time to withdraw their advertisements and close cleanly, then make sure.
        # shellcheck disable=SC2086
        left="$(still_running_after 50 $pids)"
        if [ -n "$left" ]; then
            # shellcheck disable=SC2086
            kill -KILL $left 2>/dev/null || true
            # shellcheck disable=SC2086
            still_running_after 25 $left >/dev/null
        fi
    fi
    local failed=""
    for ns in $namespaces; do
        ip netns del "$ns" 2>/dev/null || failed+=" $ns"
    done
    if [ -d "$STATE" ] && [ ! -L "$STATE" ]; then
        rm -f "$STATE"/node*.pid "$STATE/coordinator.pid" "$STATE/cluster.env"
    fi
    [ -z "$failed" ] || die "could not delete namespace(s)$failed"
    local kept="logs kept in $STATE"
    if [ "${PURGE:-0}" -eq 1 ]; then
        purge_state
        kept="deleted the logs, node data and token in $STATE"
    fi
    [ -z "$quiet" ] || return 0
    if [ -z "$namespaces" ]; then
        echo "no cluster was up (no ${PREFIX}* namespaces); $kept"
    else
        local count=0
        for pid in $pids; do count=$((count + 1)); done
        echo "cluster down: stopped $count process(es), deleted $(echo "$namespaces" | wc -w) namespace(s); $kept"
    fi
}

# Deletes what `up` put in the state dir, and the dir if nothing else is in it.
purge_state() {
    [ -d "$STATE" ] && [ ! -L "$STATE" ] || return 0
    local path
    rm -rf -- "$STATE/cluster"
    rm -f -- "$STATE/coordinator.log" "$STATE/coordinator.pid" "$STATE/cluster.env"
    for path in "$STATE"/node*; do
        [[ "${path##*/}" =~ ^node[0-9]+(\.log|\.pid)?$ ]] && rm -rf -- "$path"
    done
    rmdir -- "$STATE" 2>/dev/null || true
}

cmd_status() {
    local found ns addr role pid pidfile k port="" model="" peers="" bad=0 p cmd
    found="$(our_namespaces)"
    if [ -z "$found" ]; then
        echo "no cluster is up (no ${PREFIX}* namespaces)"
        return 0
    fi
    if [ -f "$STATE/cluster.env" ]; then
        while IFS='=' read -r k p; do
            case "$k" in
                port) port="$p" ;;
                model) model="$p" ;;
                peers) peers="$p" ;;
            esac
        done <"$STATE/cluster.env"
    fi
    echo "cluster on ${SUBNET}.0/24, state and logs in $STATE${peers:+; nodes $peers}"
    # The nodes `up` started (from cluster.env), so a deleted namespace shows as missing.
    local numbers
    if [ -n "$peers" ]; then
        numbers="$(seq 1 "$(echo "$peers" | tr ',' '\n' | grep -c .)")"
    else
        numbers="$(node_numbers)"
    fi
    # shellcheck disable=SC2086  # one node number per word
    for ns in "$HUB" "$COORD" $(printf "${PREFIX}node%s\n" $numbers); do
        echo "$found" | grep -qx -- "$ns" || { echo "  $ns: missing"; bad=1; continue; }
        addr="$(ip -n "$ns" -4 -o addr show dev eth0 2>/dev/null | awk '{print $4; exit}' || true)"
        pidfile=""
        case "$ns" in
            "$HUB") role="bridge br0" addr="-" ;;
            "$COORD")
                pidfile="$STATE/coordinator.pid"
                role="coordinator${model:+ (edgemoe serve $model, http://$COORD_ADDR:$port/v1)}"
                ;;
            *)
                k="${ns#"${PREFIX}node"}"
                pidfile="$STATE/node$k.pid"
                role="node$k (edge-node on ${addr%/*}:$NODE_PORT)"
                ;;
        esac
        local state=""
        if [ -n "$pidfile" ]; then
            if pid="$(running_pid "$pidfile" "$ns")"; then
                state="running (pid $pid)"
            elif [ -f "$pidfile" ]; then
                state="NOT RUNNING (exited; see ${pidfile%.pid}.log)"
                bad=1
            else
                state="not started"
            fi
        fi
        printf '  %-18s %-16s %s%s\n' "$ns" "${addr:--}" "$role" "${state:+: $state}"
        for p in $(ip netns pids "$ns" 2>/dev/null); do
            cmd="$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | cut -c1-160)" || continue
            [ -n "$cmd" ] && printf '      pid %-8s %s\n' "$p" "$cmd"
        done
    done
    return "$bad"
}

case "${1:-}" in
    up)
        shift
        cmd_up "$@"
        ;;
    down)
        case "$#:${2:-}" in
            1:) PURGE=0 ;;
            2:--purge) PURGE=1 ;;
            *) die "down takes no argument but --purge, not '${*:2}'" ;;
        esac
        check_settings
        check_tools
        cmd_down
        ;;
    status)
        [ $# -eq 1 ] || die "status takes no arguments, not '${*:2}'"
        check_settings
        check_tools
        cmd_status
        ;;
    -h | --help | help) usage ;;
    "") usage >&2; exit 2 ;;
    *) die "unknown command '$1'; use up N, status or down (see $SELF --help)" ;;
esac
