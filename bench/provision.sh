#!/usr/bin/env bash
# Provisioning benchmark of docs/BENCHMARKS.md: a fleet of DEVICES registering through
# the hub's Device Provisioning Service contract all at once (firmware-sim --provision
# dps, every device in flight, keys derived from one enrollment group, retry-after
# honoured as Azure's SDKs do), then the same fleet registering again (every device
# exists: re-provisioning). Beside it, in the same run, the same number of plain MQTT
# connections opened at once against the hub and against Mosquitto (which has no
# provisioning contract: the reference for what a connection alone costs).
#
#   cargo build --release -p hub -p firmware-sim
#   bench/provision.sh > table.md
#
# Environment: DEVICES=5000, plus bench/lib.sh's BIN, RESULTS, QUIET, MOSQUITTO; ports
# HUB_HTTP_PORT=18080, HUB_MQTT_PORT=11883, MOSQ_PORT=11884. A smoke test:
#   BIN=target/debug QUIET=0 DEVICES=20 bench/provision.sh
set -euo pipefail
source "$(dirname "$0")/lib.sh"

DEVICES=${DEVICES:-5000}
HUB_HTTP_PORT=${HUB_HTTP_PORT:-18080}
HUB_MQTT_PORT=${HUB_MQTT_PORT:-11883}
MOSQ_PORT=${MOSQ_PORT:-11884}

start_hub dps "$HUB_HTTP_PORT" "$HUB_MQTT_PORT"
"$BIN/hub" dps group create fleet --data-dir "$HUB_DIR" > /dev/null
dps=(--data-dir "$HUB_DIR" --hub-bin "$BIN/hub" --provision dps --group fleet --prefix dps-
    --devices "$DEVICES" --connect-inflight "$DEVICES" --duration 2s --rate 1 --hub-pid "$HUB_PID")
sim dps-first "${dps[@]}"
sim dps-again "${dps[@]}"
held=(--devices "$DEVICES" --connect-inflight "$DEVICES" --scenario connections --hold 2s)
sim hub-connect --data-dir "$HUB_DIR" --hub-bin "$BIN/hub" --prefix dps- "${held[@]}"
stop_pid "$HUB_PID"
start_mosquitto "$MOSQ_PORT"
sim mosquitto-connect --target "mqtt://127.0.0.1:$MOSQ_PORT" --prefix dps- "${held[@]}"
stop_pid "$MOSQ_PID"

row() {
    local name=$1 what=$2
    printf '| %s | %s | %s | %s | %s | %s | %s |\n' "$what" \
        "$(jf "$name" '.provisioning.registered | int') of $(jf "$name" '.provisioning.attempted | int')" \
        "$(jf "$name" '.provisioning.secs | ms')" \
        "$(jf "$name" '.provisioning.per_sec | int')" \
        "$(jf "$name" '.provisioning.latency_ms.p50 | ms') / $(jf "$name" '.provisioning.latency_ms.p99 | ms')" \
        "$(jf "$name" '.provisioning.throttled | int')" \
        "$(jf "$name" '.connect_rate | int')"
}
echo "| $DEVICES devices at once | assigned | seconds | registrations/s | register p50 / p99 ms | 429s | then connects/s |"
echo "|---|---:|---:|---:|---:|---:|---:|"
row dps-first "first registration (devices created)"
row dps-again "again (devices exist)"
echo
echo "| $DEVICES plain MQTT connections at once | handshakes/s | CONNECT→CONNACK p50 / p99 ms |"
echo "|---|---:|---:|"
for name in hub-connect mosquitto-connect; do
    printf '| %s | %s | %s |\n' "${name%-connect}" \
        "$(jf "$name" '.scenario.handshakes.per_sec | int')" \
        "$(jf "$name" '.scenario.handshakes.latency_ms.p50 | ms') / $(jf "$name" '.scenario.handshakes.latency_ms.p99 | ms')"
done
