#!/usr/bin/env bash
# QoS 1 telemetry throughput: the hub embedded, the hub in cluster mode (1 hub, 3 NATS
# nodes on this machine, R3), two hub nodes on the same NATS cluster (half the devices
# on each, two load sources at once), and Mosquitto, one after the other in one run,
# with the same load source (firmware-sim's lean path: QoS 1, 256 B, IN_FLIGHT per
# device, 2 s warm-up, then SECS measured) and the same shape.
#
#   [BIN=target/release] bench/cluster_telemetry.sh [DEVICES] [IN_FLIGHT] [SECS]
#
# Needs: a release build (`cargo build --release -p hub -p firmware-sim`; BIN names
# another build dir, e.g. target/debug for a smoke test), nats-server in
# target/nats-venv (the test harness or .ci/run creates it), mosquitto on PATH.
# Everything listens on 127.0.0.1 and is stopped at the end; ports: NATS client ports
# NATS_PORT..+2 (default 14220), their cluster ports NATS_ROUTE_PORT..+2 (16220),
# Mosquitto MOSQ_PORT (11884). A smoke test with a debug build:
#   BIN=target/debug NATS_PORT=24220 NATS_ROUTE_PORT=26220 MOSQ_PORT=21884 \
#       bench/cluster_telemetry.sh 4 2 1
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BIN=${BIN:-$ROOT/target/release}
case $BIN in /*) ;; *) BIN=$ROOT/$BIN ;; esac
NATS=$ROOT/target/nats-venv/bin/nats-server
DEVICES=${1:-100}
IN_FLIGHT=${2:-10}
SECS=${3:-10}
NATS_PORT=${NATS_PORT:-14220}
NATS_ROUTE_PORT=${NATS_ROUTE_PORT:-16220}
MOSQ_PORT=${MOSQ_PORT:-11884}
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
cd "$WORK"

wait_ready() { # file
    for _ in $(seq 100); do grep -q "hub ready" "$1" 2>/dev/null && return 0; sleep 0.1; done
    echo "hub did not start: $(cat "$1")" >&2; return 1
}

start_hub() { # label, extra serve args... → sets HUB_PID, HUB_DIR
    local label=$1; shift
    HUB_DIR=$WORK/$label
    HUB_AMQPS=127.0.0.1:0 "$BIN/hub" serve --data-dir "$HUB_DIR" --http 127.0.0.1:0 --mqtt 127.0.0.1:0 --mqtts 127.0.0.1:0 "$@" \
        > "$WORK/$label.out" 2> "$WORK/$label.err" &
    HUB_PID=$!
    PIDS+=("$HUB_PID")
    wait_ready "$WORK/$label.out"
}

publish() { # data dir, devices, server pid, device prefix
    "$BIN/firmware-sim" --data-dir "$1" --devices "$2" --prefix "$4" --inflight "$IN_FLIGHT" \
        --rate max --payload 256 --duration "${SECS}s" --warmup 2s --hub-pid "$3" 2> /dev/null
}

bench_hub() { # label, extra serve args...
    local label=$1; shift
    start_hub "$label" "$@"
    echo "== $label"
    publish "$HUB_DIR" "$DEVICES" "$HUB_PID" "bench-$label-"
    kill "$HUB_PID"; wait "$HUB_PID" 2>/dev/null || true
}

bench_hub embedded

# JetStream reserves a stream's max bytes on every node's disk: keep it modest.
printf '[telemetry]\nretention_bytes = 1073741824\n' > "$WORK/cluster.toml"
NATS_PIDS=()
ROUTES=nats://127.0.0.1:$NATS_ROUTE_PORT,nats://127.0.0.1:$((NATS_ROUTE_PORT + 1)),nats://127.0.0.1:$((NATS_ROUTE_PORT + 2))
CLUSTER=nats://127.0.0.1:$NATS_PORT,nats://127.0.0.1:$((NATS_PORT + 1)),nats://127.0.0.1:$((NATS_PORT + 2))
for i in 0 1 2; do
    "$NATS" -a 127.0.0.1 -js -n "n$i" -p "$((NATS_PORT + i))" -sd "$WORK/nats$i" --cluster_name bench \
        -cluster "nats://127.0.0.1:$((NATS_ROUTE_PORT + i))" -routes "$ROUTES" > "$WORK/nats$i.log" 2>&1 &
    PIDS+=("$!")
    NATS_PIDS+=("$!")
done
sleep 3
bench_hub cluster --config "$WORK/cluster.toml" \
    --cluster "$CLUSTER"
echo "nats-server CPU seconds so far (3 nodes): $(ps -o times= -p "${NATS_PIDS[@]}" | tr '\n' ' ')"

# Two hub nodes on the same cluster, half the devices on each, both loaded at once.
HALF=$((DEVICES / 2))
start_hub node-a --config "$WORK/cluster.toml" --cluster "$CLUSTER"
A=($HUB_PID "$HUB_DIR")
start_hub node-b --config "$WORK/cluster.toml" --cluster "$CLUSTER"
B=($HUB_PID "$HUB_DIR")
echo "== two hub nodes (node A, then node B; add the msgs/s)"
publish "${A[1]}" "$HALF" "${A[0]}" bench-node-a- > "$WORK/a.txt" &
LA=$!
publish "${B[1]}" "$HALF" "${B[0]}" bench-node-b- > "$WORK/b.txt"
wait "$LA"
cat "$WORK/a.txt" "$WORK/b.txt"
kill "${A[0]}" "${B[0]}"; wait "${A[0]}" "${B[0]}" 2>/dev/null || true
echo "nats-server CPU seconds over both cluster runs (3 nodes): $(ps -o times= -p "${NATS_PIDS[@]}" | tr '\n' ' ')"

cat > "$WORK/mosq.conf" <<CONF
listener $MOSQ_PORT 127.0.0.1
allow_anonymous true
persistence false
CONF
mosquitto -c "$WORK/mosq.conf" > /dev/null 2>&1 &
M=$!
PIDS+=("$M")
sleep 0.5
echo "== mosquitto"
"$BIN/firmware-sim" --target "mqtt://127.0.0.1:$MOSQ_PORT" --devices "$DEVICES" --inflight "$IN_FLIGHT" \
    --rate max --payload 256 --duration "${SECS}s" --warmup 2s --hub-pid "$M" 2> /dev/null
