#!/usr/bin/env bash
# Several hub builds (and Mosquitto) under one telemetry shape, alternating, ROUNDS
# times: the A/B behind "did main regress?" in docs/BENCHMARKS.md (issue 17). Each hub
# run gets a fresh data dir and a 2 s provisioning run first; the load source is
# firmware-sim's lean path for every server.
#
#   bench/compare_builds.sh DEVICES IN_FLIGHT QOS ROUNDS LABEL=HUB_BINARY|mosquitto...
#   e.g. bench/compare_builds.sh 100 10 1 3 old=/tmp/hub-4a6a9b5 new=target/release/hub mosquitto=mosquitto
#
# Needs a release firmware-sim (SIM=, default target/release/firmware-sim), mosquitto
# on PATH for the mosquitto label, and python3. HUB_EXTRA adds `hub serve` arguments
# (e.g. "--config linger.toml"). SERVER_CPUS and LOAD_CPUS (taskset lists, e.g. 0 and
# 1) pin the server and the measured load source to separate cores. Prints one line
# per run; everything on 127.0.0.1.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIM=${SIM:-$ROOT/target/release/firmware-sim}
MOSQ_PORT=${MOSQ_PORT:-11884}
DEV=$1; INF=$2; QOS=$3; ROUNDS=$4; shift 4
SERVER=() LOAD=()
[[ -n ${SERVER_CPUS:-} ]] && SERVER=(taskset -c "$SERVER_CPUS")
[[ -n ${LOAD_CPUS:-} ]] && LOAD=(taskset -c "$LOAD_CPUS")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_connections -1\npersistence false\nuser root\nlog_dest stderr\nlog_type error\n' \
    "$MOSQ_PORT" > "$WORK/mosquitto.conf"
summary() { # report.json label
    python3 - "$1" "$2" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); c = r.get("cpu") or {}; p = r.get("puback_ms") or {}
cores = c.get("hub_cores") or 0
rate = r["msgs_per_sec"]
print(f"{sys.argv[2]:<16} msgs/s {rate:>9,.0f}  p50 {p.get('p50')}  p99 {p.get('p99')}  p99.9 {p.get('p99_9')} ms"
      f"  server {cores:.2f} cores  load source {c.get('sim_cores') or 0:.2f} cores"
      f"  {rate / max(cores, 1e-9):>9,.0f} msgs per server core  {cores * 1e6 / max(rate, 1e-9):.2f} µs per msg")
PY
}
for round in $(seq "$ROUNDS"); do
    for spec in "$@"; do
        label=${spec%%=*} server=${spec#*=} run=$WORK/${spec%%=*}-$round
        common=(--devices "$DEV" --rate max --inflight "$INF" --qos "$QOS" --payload 256)
        if [[ $server == mosquitto ]]; then
            "${SERVER[@]}" mosquitto -c "$WORK/mosquitto.conf" 2> /dev/null &
            pid=$!
            sleep 0.5
            "${LOAD[@]}" "$SIM" --target "mqtt://127.0.0.1:$MOSQ_PORT" "${common[@]}" --duration 10s \
                --hub-pid "$pid" --json > "$run.json" 2> /dev/null
        else
            # shellcheck disable=SC2086
            HUB_AMQPS=127.0.0.1:0 "${SERVER[@]}" "$server" serve ${HUB_EXTRA:-} --data-dir "$run" --http 127.0.0.1:0 \
                --mqtt 127.0.0.1:0 --mqtts 127.0.0.1:0 > "$run.out" 2> "$run.err" &
            pid=$!
            for _ in $(seq 100); do grep -q "hub ready" "$run.out" 2> /dev/null && break; sleep 0.1; done
            "$SIM" --data-dir "$run" --hub-bin "$server" "${common[@]}" --duration 2s > /dev/null 2>&1
            "${LOAD[@]}" "$SIM" --data-dir "$run" --hub-bin "$server" "${common[@]}" --duration 10s \
                --hub-pid "$pid" --json > "$run.json" 2> /dev/null
        fi
        kill "$pid"
        wait "$pid" 2> /dev/null
        summary "$run.json" "$label#$round"
        rm -rf "$run"
    done
done
