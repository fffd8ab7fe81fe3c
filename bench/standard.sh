#!/usr/bin/env bash
# The standard benchmarks of docs/BENCHMARKS.md, measured with firmware-sim against the
# hub and Mosquitto in one run, on loopback: QoS 1 telemetry 100×10 and 1000×1, QoS 0,
# QoS 1 100×10 over TLS (the hub's development certificates, for both servers),
# connections held and the connect rate at 15,000 devices, direct-method and twin
# reported-patch round trips (the hub only: Mosquitto has neither), and the connect
# storm (every connection dropped at once, then a server restart). Writes the
# markdown tables to stdout (or OUT=FILE); the JSON reports stay in RESULTS.
#
#   cargo build --release -p hub -p firmware-sim
#   bench/standard.sh > tables.md
#
# Sizes (environment; defaults are the documented ones):
#   SECS=10 WARMUP=2     measured seconds and warm-up of telemetry and round trips
#   CONNECTIONS=15000    devices for connections held, the connect rate and the storm
#   HOLD=20              seconds the connections are held
#   HANDSHAKES=50000     handshakes of the connect-rate run (100 in flight)
#   FLEET_A=100x10 FLEET_B=1000x1   telemetry shapes, DEVICESxIN_FLIGHT
#   METHOD_DEVICES=100   devices answering methods (and reporting twins)
#   ONLY="telemetry tls connections methods twin storm"   a subset
# Plus bench/lib.sh's BIN, RESULTS, QUIET, MOSQUITTO; ports HUB_HTTP_PORT=18080,
# HUB_MQTT_PORT=11883, MOSQ_PORT=11884, MOSQ_TLS_PORT=11885. A smoke test at tiny sizes with a debug build:
#   BIN=target/debug QUIET=0 SECS=2 WARMUP=1 CONNECTIONS=10 HOLD=2 HANDSHAKES=20 \
#       FLEET_A=10x2 FLEET_B=10x1 METHOD_DEVICES=5 bench/standard.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"

SECS=${SECS:-10}
WARMUP=${WARMUP:-2}
CONNECTIONS=${CONNECTIONS:-15000}
HOLD=${HOLD:-20}
HANDSHAKES=${HANDSHAKES:-50000}
FLEET_A=${FLEET_A:-100x10}
FLEET_B=${FLEET_B:-1000x1}
METHOD_DEVICES=${METHOD_DEVICES:-100}
ONLY=${ONLY:-telemetry tls connections methods twin storm}
HUB_HTTP_PORT=${HUB_HTTP_PORT:-18080}
HUB_MQTT_PORT=${HUB_MQTT_PORT:-11883}
MOSQ_PORT=${MOSQ_PORT:-11884}
MOSQ_TLS_PORT=${MOSQ_TLS_PORT:-11885}
OUT=${OUT:-/dev/stdout}
MOSQ=mqtt://127.0.0.1:$MOSQ_PORT
wants() { [[ " $ONLY " == *" $1 "* ]]; }

start_hub hub "$HUB_HTTP_PORT" "$HUB_MQTT_PORT"
# Mosquitto's TLS listener presents the hub's development server certificate.
MOSQ_TLS=("$MOSQ_TLS_PORT" "$HUB_DIR/certs")
start_mosquitto "$MOSQ_PORT" "${MOSQ_TLS[@]}"
HUB=(--data-dir "$HUB_DIR")
log "results in $RESULTS; hub pid $HUB_PID, mosquitto pid $MOSQ_PID"

# One telemetry shape against both servers: telemetry NAME DEVICES IN_FLIGHT QOS.
telemetry() {
    local name=$1 devices=$2 inflight=$3 qos=$4
    local common=(--devices "$devices" --inflight "$inflight" --qos "$qos" --rate max
        --payload 256 --duration "${SECS}s" --warmup "${WARMUP}s" --prefix "t$devices-")
    sim "$name-hub" "${HUB[@]}" "${common[@]}" --hub-pid "$HUB_PID"
    sim "$name-mosquitto" --target "$MOSQ" "${common[@]}" --hub-pid "$MOSQ_PID"
}

if wants telemetry; then
    telemetry qos1-a "${FLEET_A%x*}" "${FLEET_A#*x}" 1
    telemetry qos1-b "${FLEET_B%x*}" "${FLEET_B#*x}" 1
    telemetry qos0 "${FLEET_A%x*}" "${FLEET_A#*x}" 0
fi
if wants tls; then
    common=(--devices "${FLEET_A%x*}" --inflight "${FLEET_A#*x}" --qos 1 --rate max --tls
        --payload 256 --duration "${SECS}s" --warmup "${WARMUP}s" --prefix "t${FLEET_A%x*}-")
    sim tls-hub "${HUB[@]}" "${common[@]}" --hub-pid "$HUB_PID"
    sim tls-mosquitto --target "mqtt://127.0.0.1:$MOSQ_TLS_PORT" --ca-file "$HUB_DIR/certs/ca.pem" \
        "${common[@]}" --hub-pid "$MOSQ_PID"
fi
if wants connections; then
    common=(--scenario connections --devices "$CONNECTIONS" --hold "${HOLD}s" --connect-inflight 100 --prefix bench-)
    sim held-hub "${HUB[@]}" "${common[@]}" --hub-pid "$HUB_PID"
    sim held-mosquitto --target "$MOSQ" "${common[@]}" --hub-pid "$MOSQ_PID"
    common=(--scenario connect-rate --devices "$CONNECTIONS" --total "$HANDSHAKES" --connect-inflight 100 --prefix bench-)
    sim rate-hub "${HUB[@]}" "${common[@]}" --hub-pid "$HUB_PID"
    sim rate-mosquitto --target "$MOSQ" "${common[@]}" --hub-pid "$MOSQ_PID"
fi
if wants methods; then
    common=(--scenario methods --inflight 1 --duration "${SECS}s" --warmup "${WARMUP}s" --hub-pid "$HUB_PID" --prefix m-)
    sim methods-1 "${HUB[@]}" "${common[@]}" --devices 1
    sim methods-n "${HUB[@]}" "${common[@]}" --devices "$METHOD_DEVICES"
fi
if wants twin; then
    common=(--scenario twin --duration "${SECS}s" --warmup "${WARMUP}s" --hub-pid "$HUB_PID" --devices "$METHOD_DEVICES" --prefix m-)
    sim twin-1 "${HUB[@]}" "${common[@]}" --inflight 1
    sim twin-2 "${HUB[@]}" "${common[@]}" --inflight 2
fi

# storm_restart NAME SERVER_KIND sim-args… : the storm that follows a server restart.
storm_restart() {
    local name=$1 kind=$2
    shift 2
    wait_quiet
    log "$name: firmware-sim $* (restarting $kind)"
    "$SIM" "$@" --scenario storm --storm restart --hub-pid-file "$RESULTS/$kind.pid" \
        --duration 120s --json > "$RESULTS/$name.json" 2> "$RESULTS/$name.log" &
    local sim_pid=$! i
    for i in $(seq 1200); do
        grep -q "waiting for the hub to drop them" "$RESULTS/$name.log" 2> /dev/null && break
        kill -0 "$sim_pid" 2> /dev/null || break
        sleep 0.1
    done
    if [[ $kind == hub ]]; then
        stop_pid "$HUB_PID"
        start_hub hub "$HUB_HTTP_PORT" "$HUB_MQTT_PORT"
    else
        stop_pid "$MOSQ_PID"
        start_mosquitto "$MOSQ_PORT" "${MOSQ_TLS[@]}"
    fi
    wait "$sim_pid" || { log "$name failed:"; tail -5 "$RESULTS/$name.log" >&2; echo '{}' > "$RESULTS/$name.json"; }
}

if wants storm; then
    common=(--scenario storm --devices "$CONNECTIONS" --connect-inflight 100 --duration 120s --prefix bench-)
    sim storm-hub "${HUB[@]}" "${common[@]}" --hub-pid "$HUB_PID"
    sim storm-mosquitto --target "$MOSQ" "${common[@]}" --hub-pid "$MOSQ_PID"
    storm_restart restart-hub hub "${HUB[@]}" --devices "$CONNECTIONS" --connect-inflight 100 --prefix bench-
    storm_restart restart-mosquitto mosquitto --target "$MOSQ" --devices "$CONNECTIONS" --connect-inflight 100 --prefix bench-
fi

# ---------------------------------------------------------------------------------
# The tables.

row() { # label jq-expression name-hub name-mosquitto
    printf '| %s | %s | %s |\n' "$1" "$(jf "$3" "$2")" "$(jf "$4" "$2")"
}

{
    echo "Measured $(date -u +%Y-%m-%d) with \`bench/standard.sh\` (firmware-sim $("$SIM" --version | cut -d' ' -f2),"
    echo "hub $(git -C "$ROOT" rev-parse --short HEAD 2> /dev/null || echo '?'), $(basename "$BIN") build; Mosquitto $("$MOSQUITTO" -h 2> /dev/null | head -1 | grep -o '[0-9][0-9.]*' | head -1))"
    echo "on $(nproc) CPUs; JSON reports in \`$RESULTS\`."
    echo
    shapes=()
    wants telemetry && shapes+=(qos1-a qos1-b qos0)
    wants tls && shapes+=(tls)
    if ((${#shapes[@]})); then
        for shape in "${shapes[@]}"; do
            case $shape in
                qos1-a) title="QoS 1, ${FLEET_A%x*} devices × ${FLEET_A#*x} in flight" ;;
                qos1-b) title="QoS 1, ${FLEET_B%x*} devices × ${FLEET_B#*x} in flight" ;;
                qos0) title="QoS 0, ${FLEET_A%x*} devices, batches of ${FLEET_A#*x}" ;;
                tls) title="QoS 1 over TLS, ${FLEET_A%x*} devices × ${FLEET_A#*x} in flight" ;;
            esac
            echo "### Telemetry: $title, 256 B, ${SECS} s after ${WARMUP} s warm-up"
            echo
            echo "| | hub | Mosquitto |"
            echo "|---|---:|---:|"
            if [[ $shape == qos0 ]]; then
                # Timed to each device's closing QoS 1 fence: what the server took in.
                row "**msgs/s** (taken in)" '.msgs_per_sec | int' "$shape-hub" "$shape-mosquitto"
            else
                row "**msgs/s** (acknowledged)" '.msgs_per_sec | int' "$shape-hub" "$shape-mosquitto"
                row "publish→PUBACK p50 / p90 ms" '"\(.puback_ms.p50 | ms) / \(.puback_ms.p90 | ms)"' "$shape-hub" "$shape-mosquitto"
                row "**p99** / p99.9 / max ms" '"\(.puback_ms.p99 | ms) / \(.puback_ms.p99_9 | ms) / \(.puback_ms.max | ms)"' "$shape-hub" "$shape-mosquitto"
                row "sent / acked / failed" '"\(.sent | int) / \(.acked | int) / \(.failed | int)"' "$shape-hub" "$shape-mosquitto"
            fi
            row "server CPU (cores)" '.cpu.hub_cores | ms' "$shape-hub" "$shape-mosquitto"
            row "msgs/s per server core" '(.msgs_per_sec / .cpu.hub_cores) | int' "$shape-hub" "$shape-mosquitto"
            row "server CPU per message (µs)" '(.cpu.hub_cores / .msgs_per_sec * 1e6) | ms' "$shape-hub" "$shape-mosquitto"
            row "load source CPU (cores)" '.cpu.sim_cores | ms' "$shape-hub" "$shape-mosquitto"
            row "other processes (CPU s)" '.cpu.other_secs | ms' "$shape-hub" "$shape-mosquitto"
            echo
        done
    fi
    if wants connections; then
        echo "### Connections: ${CONNECTIONS} held for ${HOLD} s; ${HANDSHAKES} handshakes, 100 in flight"
        echo
        echo "| | hub (SAS) | Mosquitto (anonymous) |"
        echo "|---|---:|---:|"
        row "held / open at the end" '"\(.scenario.held.held | int) / \(.scenario.held.open_after_hold | int)"' held-hub held-mosquitto
        row "server RSS before → held → end (KiB)" '"\(.scenario.held.hub_rss_before_kib | int) → \(.scenario.held.hub_rss_held_kib | int) → \(.scenario.held.hub_rss_end_kib | int)"' held-hub held-mosquitto
        row "**RSS per idle connection** (KiB)" '.scenario.held.hub_kib_per_connection | ms' held-hub held-mosquitto
        row "time to open them (ms)" '.scenario.handshakes.secs | if type == "number" then . * 1000 | int else . end' held-hub held-mosquitto
        row "**handshakes/s**" '.scenario.handshakes.per_sec | int' rate-hub rate-mosquitto
        row "CONNACK p50 / p90 / p99 ms" '.scenario.handshakes.latency_ms | "\(.p50 | ms) / \(.p90 | ms) / \(.p99 | ms)"' rate-hub rate-mosquitto
        row "failed handshakes" '"\(.scenario.handshakes.failed | int) of \(.scenario.handshakes.attempted | int)"' rate-hub rate-mosquitto
        row "server CPU per handshake (µs)" '.scenario | (.cpu.hub_secs / .handshakes.ok * 1e6) | ms' rate-hub rate-mosquitto
        row "load source CPU per handshake (µs)" '.scenario | (.cpu.sim_secs / .handshakes.ok * 1e6) | ms' rate-hub rate-mosquitto
        row "other processes (CPU s)" '.scenario.cpu.other_secs | ms' rate-hub rate-mosquitto
        echo
    fi
    if wants methods || wants twin; then
        echo "### Round trips (hub), ${SECS} s after ${WARMUP} s warm-up"
        echo
        echo "| | round trips | per s | p50 ms | p90 ms | **p99 ms** | p99.9 ms | max ms | failed | hub CPU (cores) |"
        echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        rt() {
            printf '| %s | %s |\n' "$1" "$(jf "$2" '.scenario | [(.round_trips.measured | int), (.round_trips.per_sec | int), (.round_trips.latency_ms | .p50, .p90, .p99, .p99_9, .max | ms), (.round_trips.failed | int), (.cpu.hub_cores | ms)] | join(" | ")')"
        }
        if wants methods; then
            rt "direct method, 1 device, 1 in flight" methods-1
            rt "direct method, ${METHOD_DEVICES} devices, 1 in flight each" methods-n
        fi
        if wants twin; then
            rt "twin reported patch, ${METHOD_DEVICES} devices, 1 in flight each" twin-1
            rt "twin reported patch, ${METHOD_DEVICES} devices, 2 in flight each" twin-2
        fi
        echo
    fi
    if wants storm; then
        echo "### Connect storm: ${CONNECTIONS} devices lose their connections at once"
        echo
        echo "| | hub | Mosquitto |"
        echo "|---|---:|---:|"
        storm_rows() { # label-suffix hub-name mosquitto-name
            row "back / connected before ($1)" '.scenario.storm | "\(.back | int) / \(.connected_before | int)"' "$2" "$3"
            row "**time until all are back** ($1, ms)" '.scenario.storm.secs_to_all_back | if type == "number" then . * 1000 | ms else . end' "$2" "$3"
            row "reconnect attempts / failed ($1)" '.scenario.storm | "\(.reconnect_attempts | int) / \(.reconnect_failed | int)"' "$2" "$3"
            row "server RSS start → peak → end ($1, KiB)" '.scenario.storm.hub | "\(.rss_start_kib | int) → \(.rss_peak_kib | int) → \(.rss_end_kib | int)"' "$2" "$3"
            row "server CPU s (peak cores over 100 ms) ($1)" '.scenario.storm.hub | "\(.cpu_secs | ms) (\(.cpu_peak_cores | ms))"' "$2" "$3"
        }
        storm_rows "dropped by the devices" storm-hub storm-mosquitto
        storm_rows "server restarted" restart-hub restart-mosquitto
        echo
    fi
} > "$OUT"
log "done; reports in $RESULTS"
