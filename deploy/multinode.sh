#!/usr/bin/env bash
# Three wasm-echo nodes behind Debian's nginx (its stream module), all on
# loopback: the multi-node setup the README describes, and the one
# tests/e2e/multinode.rs runs.
#
#   deploy/multinode.sh start DIR    writes the configs into DIR, starts the
#                                    nodes and nginx, returns once all serve
#   deploy/multinode.sh stop DIR     drains the nodes (SIGTERM) and stops nginx
#   deploy/multinode.sh config DIR   only writes the configs
#
# The nodes listen on 127.0.0.11, 127.0.0.12 and 127.0.0.13 (UDP and TCP on
# NODE_PORT, the admin endpoint on ADMIN_PORT); nginx listens on
# 127.0.0.1:PORT (UDP and TCP). TCP goes to the nodes round-robin with a
# PROXY protocol header naming the client; UDP goes to the node picked by a
# consistent hash of the client's address. Everything runs as the current
# user from DIR: configs, logs (DIR/node1.log, DIR/nginx-error.log, ...),
# pid files, control sockets (DIR/node1.sock for `wasm-echo reload
# --control`). nginx is started with its own config (`-p DIR -c FILE`), never
# as the system service, and nothing listens on a non-loopback address.
#
# Settings (environment, with defaults):
#   WASM_ECHO    the binary           target/release/wasm-echo of this checkout
#   PLUGIN       what every node serves (a built-in or a .wasm path)   counter
#   PORT         the balancer's port on 127.0.0.1                      12345
#   NODE_PORT    each node's port on its own address                   12345
#   ADMIN_PORT   each node's /metrics, /healthz, /readyz port           9100
#   DRAIN_DELAY  each node's drain-delay                                5s
#   GRACE        each node's grace period                               5s
#   NGINX        the nginx binary                                       /usr/sbin/nginx
#   LIFETIME     if set (a `timeout` duration: 300, 5m), every process
#                started is sent SIGTERM after it: the tests' bound on what
#                they leave behind. Each then runs under coreutils'
#                `timeout`, whose pid is in the pid file; it passes a
#                SIGTERM sent to it on to the process
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
WASM_ECHO=${WASM_ECHO:-$repo/target/release/wasm-echo}
PLUGIN=${PLUGIN:-counter}
PORT=${PORT:-12345}
NODE_PORT=${NODE_PORT:-12345}
ADMIN_PORT=${ADMIN_PORT:-9100}
DRAIN_DELAY=${DRAIN_DELAY:-5s}
GRACE=${GRACE:-5s}
NGINX=${NGINX:-/usr/sbin/nginx}
LIFETIME=${LIFETIME:-}
NODES=(127.0.0.11 127.0.0.12 127.0.0.13)
# Where Debian's libnginx-mod-stream puts the module.
STREAM_MODULE=/usr/lib/nginx/modules/ngx_stream_module.so
# How long anything may take to come up before `start` gives up.
START_TIMEOUT=60

usage() {
    echo "usage: $0 start|stop|config DIR" >&2
    exit 2
}

die() {
    echo "multinode: $*" >&2
    exit 1
}

# Writes DIR/node{1,2,3}.toml and DIR/nginx.conf.
write_configs() {
    local dir=$1 plugin=$PLUGIN
    # A path is made absolute: the node resolves it from its config's folder.
    if [[ $plugin == */* ]]; then
        plugin=$(realpath "$plugin") || die "no plugin at $PLUGIN"
    fi
    local i=0 ip upstream=""
    for ip in "${NODES[@]}"; do
        i=$((i + 1))
        cat >"$dir/node$i.toml" <<TOML
# Node $i of deploy/multinode.sh: behind nginx on 127.0.0.1.
grace = "$GRACE"
drain-delay = "$DRAIN_DELAY"

[listeners.main]
plugin = "$plugin"
udp = "$ip:$NODE_PORT"
tcp = "$ip:$NODE_PORT"
# nginx sends each TCP client's address first (proxy_protocol on); only
# nginx may.
proxy-protocol = true
proxy-from = ["127.0.0.1/32"]
TOML
        # One failed connect or exchange takes a node out for 5 s (OSS nginx
        # has only these passive checks; it never reads /readyz).
        upstream+="        server $ip:$NODE_PORT max_fails=1 fail_timeout=5s;"$'\n'
    done
    # Workers of a master started as root would otherwise run as `nobody`.
    local user=""
    if [ "$(id -u)" -eq 0 ]; then
        user="user $(id -un) $(id -gn);"
    fi
    cat >"$dir/nginx.conf" <<NGINX
# The balancer of deploy/multinode.sh (generated; edit the script instead).
load_module $STREAM_MODULE;
daemon off;
$user
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/nginx-error.log notice;
events {
    worker_connections 1024;
}
stream {
    log_format nodes '\$remote_addr:\$remote_port \$protocol \$status \$upstream_addr';
    access_log $dir/nginx-access.log nodes;

    upstream wasm_echo_tcp {
$upstream    }
    upstream wasm_echo_udp {
        # A client always reaches the same node, where its plugin state is.
        hash \$remote_addr consistent;
$upstream    }

    server {
        listen 127.0.0.1:$PORT;
        proxy_pass wasm_echo_tcp;
        # The node learns the client's address from this header.
        proxy_protocol on;
        # A node that stopped accepting refuses at once; the connect is then
        # tried on the next node (proxy_next_upstream, on by default).
        proxy_connect_timeout 2s;
    }
    server {
        listen 127.0.0.1:$PORT udp;
        proxy_pass wasm_echo_udp;
        # One session per client address and port, kept while it talks:
        # the node sees one peer per client, so the plugin's per-peer
        # state holds. No proxy_responses: a plugin may answer a datagram
        # with nothing, and a session must not wait for it.
        proxy_timeout 30s;
    }
}
NGINX
}

# Runs "$@" in the background, its output in $out and $err; its pid in $pidfile.
launch() {
    local pidfile=$1 out=$2 err=$3
    shift 3
    if [ -n "$LIFETIME" ]; then
        # --foreground: a SIGTERM sent to `timeout` reaches the process
        # once. Without it, timeout also signals its process group, and the
        # node, signalled twice, takes the second as "stop now".
        set -- timeout --foreground "$LIFETIME" "$@"
    fi
    "$@" </dev/null >"$out" 2>"$err" &
    echo $! >"$pidfile"
}

# Whether process $1 runs. A process that has exited but was never reaped
# (a zombie: its parent, this script, is gone and some containers' init
# reaps nothing) does not.
running() {
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) && [[ $state != Z* ]]
}

# Whether the process in pid file $1 runs.
alive() {
    [ -f "$1" ] && running "$(cat "$1")"
}

start() {
    local dir=$1
    [ -x "$WASM_ECHO" ] || die "no wasm-echo at $WASM_ECHO: build it (cargo build --release) or set WASM_ECHO"
    [ -x "$NGINX" ] && [ -f "$STREAM_MODULE" ] ||
        die "nginx with its stream module is missing: scripts/install-debian.sh installs it"
    local i
    for i in 1 2 3; do
        alive "$dir/node$i.pid" && die "node $i already runs (pid $(cat "$dir/node$i.pid")): $0 stop $dir"
    done
    alive "$dir/nginx.pid" && die "nginx already runs in $dir: $0 stop $dir"
    write_configs "$dir"
    "$NGINX" -t -q -p "$dir" -c "$dir/nginx.conf" -e "$dir/nginx-error.log" ||
        die "nginx refuses $dir/nginx.conf (see above)"
    for i in 1 2 3; do
        launch "$dir/node$i.pid" "$dir/node$i.out" "$dir/node$i.log" \
            "$WASM_ECHO" serve --config "$dir/node$i.toml" \
            --metrics "${NODES[i - 1]}:$ADMIN_PORT" --control "$dir/node$i.sock"
    done
    # A node is ready once it has printed its `listening` lines (udp, tcp,
    # metrics): wasm-echo prints them once /readyz says ready.
    local deadline=$((SECONDS + START_TIMEOUT))
    for i in 1 2 3; do
        until [ "$(grep -c '^listening ' "$dir/node$i.out" 2>/dev/null)" -ge 3 ]; do
            if ! alive "$dir/node$i.pid"; then
                stop "$dir"
                die "node $i did not start: $(tail -n 3 "$dir/node$i.log")"
            fi
            if [ $SECONDS -ge $deadline ]; then
                stop "$dir"
                die "node $i did not start within ${START_TIMEOUT}s (see $dir/node$i.log)"
            fi
            sleep 0.05
        done
    done
    # The pid file is written once nginx has bound its ports.
    rm -f "$dir/nginx.pid"
    launch "$dir/nginx.launch.pid" "$dir/nginx.out" "$dir/nginx.stderr" \
        "$NGINX" -p "$dir" -c "$dir/nginx.conf" -e "$dir/nginx-error.log"
    until [ -s "$dir/nginx.pid" ]; do
        if ! alive "$dir/nginx.launch.pid" || [ $SECONDS -ge $deadline ]; then
            stop "$dir"
            die "nginx did not start: $(tail -n 3 "$dir/nginx-error.log" "$dir/nginx.stderr" 2>/dev/null)"
        fi
        sleep 0.05
    done
    for i in 1 2 3; do
        echo "node$i $(grep '^listening ' "$dir/node$i.out" | tr '\n' ' ')pid $(cat "$dir/node$i.pid")"
    done
    echo "balancer udp+tcp 127.0.0.1:$PORT pid $(cat "$dir/nginx.launch.pid")"
}

# Stops what runs in DIR: the nodes drain (SIGTERM: /readyz 503, serving
# for the drain delay, then the grace period), then nginx stops. Bounded.
stop() {
    local dir=$1 pidfile pids=()
    for pidfile in "$dir"/node{1,2,3}.pid; do
        if alive "$pidfile"; then
            pids+=("$(cat "$pidfile")")
        fi
    done
    [ ${#pids[@]} -gt 0 ] && kill -TERM "${pids[@]}" 2>/dev/null || true
    # The drain delay and grace period, and a little more; then SIGKILL.
    wait_gone 120 "${pids[@]}"
    if alive "$dir/nginx.launch.pid"; then
        kill -TERM "$(cat "$dir/nginx.launch.pid")" 2>/dev/null || true
        wait_gone 20 "$(cat "$dir/nginx.launch.pid")"
    fi
    rm -f "$dir"/node{1,2,3}.pid "$dir/nginx.launch.pid"
}

# Waits up to $1 seconds for the processes $2... to exit, then kills them.
wait_gone() {
    local limit=$1 pid
    shift
    local deadline=$((SECONDS + limit))
    for pid in "$@"; do
        while running "$pid"; do
            if [ $SECONDS -ge $deadline ]; then
                echo "multinode: $pid still runs after ${limit}s: killing it" >&2
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.1
        done
    done
}

[ $# -eq 2 ] || usage
# The control sockets are there: the folder is the user's alone.
mkdir -p -m 700 "$2"
dir=$(cd "$2" && pwd)
case $1 in
start) start "$dir" ;;
stop) stop "$dir" ;;
config) write_configs "$dir" ;;
*) usage ;;
esac
