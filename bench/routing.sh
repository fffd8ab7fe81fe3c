#!/usr/bin/env bash
# Routing benchmarks of docs/BENCHMARKS.md (issue 26), measured with firmware-sim and the
# tests' webhook receiver process (tests/receivers/webhook_receiver.py --stats, which
# takes each event's latency as its arrival minus the CloudEvents `time`, the hub's
# enqueue time, on the same clock):
#   1. QoS 1 ingest with no routes, then with three routes active (one to a named
#      stream, one to a webhook, one filtered out), and Mosquitto's on the same shape;
#   2. telemetry → webhook latency at RATE_DEVICES × RATE msgs/s (10,000 by default);
#   3. connection-state event delivery for a connect storm of STORM devices.
# Writes a markdown table to stdout (or OUT=FILE); JSON reports stay in RESULTS.
#
#   cargo build --release -p hub -p firmware-sim
#   bench/routing.sh > routing.md
#
# Sizes (environment): SECS=10 WARMUP=2 FLEET=100x10 (ingest DEVICESxIN_FLIGHT),
# RATE_DEVICES=100 RATE=100 (latency run), STORM=5000, BATCH=100 (the webhook's
# maxBatchSize). Plus bench/lib.sh's BIN, RESULTS, QUIET, MOSQUITTO; ports
# HUB_HTTP_PORT=18180, HUB_MQTT_PORT=11983, MOSQ_PORT=11984. A smoke test:
#   BIN=target/debug QUIET=0 SECS=2 WARMUP=1 FLEET=5x2 RATE_DEVICES=5 RATE=10 STORM=20 bench/routing.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"

SECS=${SECS:-10}
WARMUP=${WARMUP:-2}
FLEET=${FLEET:-100x10}
RATE_DEVICES=${RATE_DEVICES:-100}
RATE=${RATE:-100}
STORM=${STORM:-5000}
BATCH=${BATCH:-100}
HUB_HTTP_PORT=${HUB_HTTP_PORT:-18180}
HUB_MQTT_PORT=${HUB_MQTT_PORT:-11983}
MOSQ_PORT=${MOSQ_PORT:-11984}
OUT=${OUT:-/dev/stdout}
API=http://127.0.0.1:$HUB_HTTP_PORT

python3 "$ROOT/tests/receivers/webhook_receiver.py" --stats > "$RESULTS/receiver.out" 2> "$RESULTS/receiver.err" &
PIDS+=("$!")
for _ in $(seq 100); do
    grep -q listening "$RESULTS/receiver.out" 2> /dev/null && break
    sleep 0.1
done
RECEIVER=http://127.0.0.1:$(awk '/listening/ {print $2}' "$RESULTS/receiver.out")

start_hub hub "$HUB_HTTP_PORT" "$HUB_MQTT_PORT"
start_mosquitto "$MOSQ_PORT"
HUB=(--data-dir "$HUB_DIR")
TOKEN=$("$BIN/hub" token --data-dir "$HUB_DIR" --scope registry:read,registry:write,service:connect)
log "results in $RESULTS; hub pid $HUB_PID, mosquitto pid $MOSQ_PID, receiver $RECEIVER"

routing() { # JSON on stdin
    curl -sf -X PUT -H "Authorization: Bearer $TOKEN" -H 'content-type: application/json' \
        --data-binary @- "$API/configuration/routing" > /dev/null
}
receiver_reset() { curl -sf -X POST "$RECEIVER/_reset" > /dev/null; }
# Waits until every endpoint delivered what is in the logs (at most 300 s); prints seconds.
drain() {
    local start=$SECONDS lag
    while ((SECONDS - start < 300)); do
        lag=$(curl -sf "$API/metrics" | awk '/^hub_routing_lag\{/ {s += $2} END {print s + 0}')
        [[ $lag == 0 ]] && break
        sleep 0.5
    done
    echo $((SECONDS - start))
}
stats() { # NAME: the receiver's latency statistics into NAME.json
    curl -sf "$RECEIVER/_stats" > "$RESULTS/$1.json"
}

hook='{"name": "hook", "url": "'"$RECEIVER"'/hook", "maxBatchSize": '"$BATCH"'}'

# 1. Ingest without routes, with three, and Mosquitto's.
ingest=(--devices "${FLEET%x*}" --inflight "${FLEET#*x}" --qos 1 --rate max --payload 256
    --duration "${SECS}s" --warmup "${WARMUP}s" --prefix ingest-)
echo '{}' | routing
sim ingest-none "${HUB[@]}" "${ingest[@]}" --hub-pid "$HUB_PID"
routing << JSON
{"endpoints": {"webhooks": [$hook], "streams": [{"name": "copy"}, {"name": "never"}]},
 "routes": [
  {"name": "to-stream", "source": "DeviceMessages", "condition": "true", "endpointNames": ["copy"], "isEnabled": true},
  {"name": "to-webhook", "source": "DeviceMessages", "condition": "true", "endpointNames": ["hook"], "isEnabled": true},
  {"name": "filtered", "source": "DeviceMessages", "condition": "level = 'never'", "endpointNames": ["never"], "isEnabled": true}]}
JSON
receiver_reset
sim ingest-routes "${HUB[@]}" "${ingest[@]}" --hub-pid "$HUB_PID"
INGEST_DRAIN=$(drain)
stats ingest-webhook
sim ingest-mosquitto --target "mqtt://127.0.0.1:$MOSQ_PORT" "${ingest[@]}" --hub-pid "$MOSQ_PID"

# 2. Telemetry → webhook latency at a fixed rate.
routing << JSON
{"endpoints": {"webhooks": [$hook]},
 "routes": [{"name": "to-webhook", "source": "DeviceMessages", "condition": "true", "endpointNames": ["hook"], "isEnabled": true}]}
JSON
receiver_reset
sim latency "${HUB[@]}" --devices "$RATE_DEVICES" --rate "$RATE" --inflight 10 --qos 1 --payload 256 \
    --duration "${SECS}s" --warmup "${WARMUP}s" --prefix rate- --hub-pid "$HUB_PID"
LATENCY_DRAIN=$(drain)
stats latency-webhook

# 3. Connection-state events of a connect storm (every device connects at once, 100
#    handshakes in flight, held, then dropped).
routing << JSON
{"endpoints": {"webhooks": [$hook]},
 "routes": [{"name": "connections", "source": "DeviceConnectionStateEvents", "condition": "true", "endpointNames": ["hook"], "isEnabled": true}]}
JSON
receiver_reset
sim storm "${HUB[@]}" --scenario connections --devices "$STORM" --hold 10s --connect-inflight 100 \
    --prefix storm- --hub-pid "$HUB_PID"
STORM_DRAIN=$(drain)
stats storm-events

{
    echo "Measured $(date -u +%Y-%m-%d) with \`bench/routing.sh\` (hub $(git -C "$ROOT" rev-parse --short HEAD 2> /dev/null || echo '?'),"
    echo "$(basename "$BIN") build; Mosquitto $("$MOSQUITTO" -h 2> /dev/null | head -1 | grep -o '[0-9][0-9.]*' | head -1)) on $(nproc) CPUs; JSON reports in \`$RESULTS\`."
    echo
    echo "| measure | value |"
    echo "|---|---|"
    echo "| QoS 1 ingest ${FLEET%x*}×${FLEET#*x}, no routes, msgs/s | $(jf ingest-none '.msgs_per_sec | int') |"
    echo "| the same, three routes (stream, webhook, filtered out), msgs/s | $(jf ingest-routes '.msgs_per_sec | int') |"
    echo "| the same, Mosquitto, msgs/s | $(jf ingest-mosquitto '.msgs_per_sec | int') |"
    echo "| PUBACK p99 no routes / three routes, ms | $(jf ingest-none '.puback_ms.p99 | ms') / $(jf ingest-routes '.puback_ms.p99 | ms') |"
    echo "| webhook events after the routed run / seconds to drain the routes | $(jf ingest-webhook '.count | int') / $INGEST_DRAIN |"
    echo "| telemetry at ${RATE_DEVICES}×${RATE}/s: acked msgs/s | $(jf latency '.msgs_per_sec | int') |"
    echo "| telemetry → webhook latency p50 / p99 / max, ms ($(jf latency-webhook '.count | int') events, drained ${LATENCY_DRAIN} s after) | $(jf latency-webhook '.p50_ms | ms') / $(jf latency-webhook '.p99_ms | ms') / $(jf latency-webhook '.max_ms | ms') |"
    echo "| connect storm of $STORM: connected, connect s | $(jf storm '.connected | int'), $(jf storm '.connect_secs | ms') |"
    echo "| connection-state events delivered (connect + disconnect) | $(jf storm-events '.count | int') |"
    echo "| event delivery latency p50 / p99 / max, ms (drained ${STORM_DRAIN} s after) | $(jf storm-events '.p50_ms | ms') / $(jf storm-events '.p99_ms | ms') / $(jf storm-events '.max_ms | ms') |"
} > "$OUT"
