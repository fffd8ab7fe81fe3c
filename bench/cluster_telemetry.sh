#!/usr/bin/env bash
# QoS 1 telemetry throughput: the hub embedded, the hub in cluster mode (1 hub, 3 NATS
# nodes on this machine, R3), two hub nodes on the same NATS cluster (half the devices
# on each, two load sources at once), and Mosquitto, one after the other in one run,
# with the same load source (tests/src/bin/mqtt_publish_bench.rs) and the same shape.
#
#   bench/cluster_telemetry.sh [DEVICES] [IN_FLIGHT] [SECS]
#
# Needs: a release build (`cargo build --release -p hub -p hub-tests`), nats-server
# in target/nats-venv (the test harness or .ci/run creates it), mosquitto on PATH.
# Everything listens on 127.0.0.1 and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BIN=$ROOT/target/release
NATS=$ROOT/target/nats-venv/bin/nats-server
DEVICES=${1:-100}
IN_FLIGHT=${2:-10}
SECS=${3:-10}
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

start_hub() { # label, extra serve args... → sets HUB_PID, HUB_MQTT, HUB_SAS
    local label=$1 count=$2; shift 2
    local dir=$WORK/$label
    "$BIN/hub" serve --data-dir "$dir" --http 127.0.0.1:0 --mqtt 127.0.0.1:0 --mqtts 127.0.0.1:0 "$@" \
        > "$WORK/$label.out" 2> "$WORK/$label.err" &
    HUB_PID=$!
    PIDS+=("$HUB_PID")
    wait_ready "$WORK/$label.out"
    local http mqtt
    http=$(sed -n 's/.*http=\([^ ]*\).*/\1/p' "$WORK/$label.out")
    mqtt=$(sed -n 's/.*mqtt=\([^ ]*\) .*/\1/p' "$WORK/$label.out")
    local token
    token=$("$BIN/hub" token --data-dir "$dir" --scope registry:read,registry:write)
    "$BIN/mqtt_connect_bench" provision --http "http://$http" --token "$token" \
        --count "$count" --prefix "bench-$label-" --hostname localhost --out "$WORK/$label.sas" > /dev/null
    HUB_MQTT=$mqtt
    HUB_SAS=$WORK/$label.sas
}

publish() { # mqtt addr, sas file, devices, server pid
    "$BIN/mqtt_publish_bench" --addr "$1" --sas-file "$2" \
        --devices "$3" --in-flight "$IN_FLIGHT" --payload 256 --secs "$SECS" \
        --warmup-secs 2 --server-pid "$4"
}

bench_hub() { # label, extra serve args...
    local label=$1; shift
    start_hub "$label" "$DEVICES" "$@"
    echo "== $label"
    publish "$HUB_MQTT" "$HUB_SAS" "$DEVICES" "$HUB_PID"
    kill "$HUB_PID"; wait "$HUB_PID" 2>/dev/null || true
}

bench_hub embedded

# JetStream reserves a stream's max bytes on every node's disk: keep it modest.
printf '[telemetry]\nretention_bytes = 1073741824\n' > "$WORK/cluster.toml"
NATS_PIDS=()
ROUTES=nats://127.0.0.1:16220,nats://127.0.0.1:16221,nats://127.0.0.1:16222
for i in 0 1 2; do
    "$NATS" -a 127.0.0.1 -js -n "n$i" -p "1422$i" -sd "$WORK/nats$i" --cluster_name bench \
        -cluster "nats://127.0.0.1:1622$i" -routes "$ROUTES" > "$WORK/nats$i.log" 2>&1 &
    PIDS+=("$!")
    NATS_PIDS+=("$!")
done
sleep 3
bench_hub cluster --config "$WORK/cluster.toml" \
    --cluster nats://127.0.0.1:14220,nats://127.0.0.1:14221,nats://127.0.0.1:14222
echo "nats-server CPU seconds so far (3 nodes): $(ps -o times= -p "${NATS_PIDS[@]}" | tr '\n' ' ')"

# Two hub nodes on the same cluster, half the devices on each, both loaded at once.
CLUSTER=nats://127.0.0.1:14220,nats://127.0.0.1:14221,nats://127.0.0.1:14222
HALF=$((DEVICES / 2))
start_hub node-a "$HALF" --config "$WORK/cluster.toml" --cluster "$CLUSTER"
A=($HUB_PID "$HUB_MQTT" "$HUB_SAS")
start_hub node-b "$HALF" --config "$WORK/cluster.toml" --cluster "$CLUSTER"
B=($HUB_PID "$HUB_MQTT" "$HUB_SAS")
echo "== two hub nodes (node A, then node B; add the msgs/s)"
publish "${A[1]}" "${A[2]}" "$HALF" "${A[0]}" > "$WORK/a.txt" &
LA=$!
publish "${B[1]}" "${B[2]}" "$HALF" "${B[0]}" > "$WORK/b.txt"
wait "$LA"
cat "$WORK/a.txt" "$WORK/b.txt"
kill "${A[0]}" "${B[0]}"; wait "${A[0]}" "${B[0]}" 2>/dev/null || true
echo "nats-server CPU seconds over both cluster runs (3 nodes): $(ps -o times= -p "${NATS_PIDS[@]}" | tr '\n' ' ')"

cat > "$WORK/mosq.conf" <<CONF
listener 11884 127.0.0.1
allow_anonymous true
persistence false
CONF
mosquitto -c "$WORK/mosq.conf" > /dev/null 2>&1 &
M=$!
PIDS+=("$M")
sleep 0.5
echo "== mosquitto"
"$BIN/mqtt_publish_bench" --addr 127.0.0.1:11884 --devices "$DEVICES" --in-flight "$IN_FLIGHT" \
    --payload 256 --secs "$SECS" --warmup-secs 2 --server-pid "$M"
