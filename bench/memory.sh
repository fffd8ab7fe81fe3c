#!/usr/bin/env bash
# Memory per registered device and per idle connection (issue 28), hub and Mosquitto
# in one run, on loopback, with firmware-sim as the load source:
#   1. a fresh hub: RSS once ready (empty);
#   2. firmware-sim provisions N devices and holds their connections briefly: RSS after
#      provisioning (same process, before the connections) from its report;
#   3. the hub restarts on that data dir: RSS once ready with N devices registered and
#      none connected;
#   4. N idle connections held for HOLD s: RSS per idle connection (held − before) ÷ N;
#   5. Mosquitto: RSS empty and per idle connection the same way.
# Writes a markdown table to stdout (or OUT=FILE).
#
#   cargo build --release -p hub -p firmware-sim
#   bench/memory.sh                       # N=15000, HOLD=20
#   HUB_BIN=/tmp/hub-old bench/memory.sh  # another hub build, the same firmware-sim
#
# Plus bench/lib.sh's BIN, RESULTS, QUIET, MOSQUITTO; ports HUB_HTTP_PORT=18080,
# HUB_MQTT_PORT=11883, MOSQ_PORT=11884.
set -euo pipefail
source "$(dirname "$0")/lib.sh"

N=${N:-15000}
HOLD=${HOLD:-20}
SETTLE=${SETTLE:-2}
HUB_HTTP_PORT=${HUB_HTTP_PORT:-18080}
HUB_MQTT_PORT=${HUB_MQTT_PORT:-11883}
MOSQ_PORT=${MOSQ_PORT:-11884}
OUT=${OUT:-/dev/stdout}
if [[ -n ${HUB_BIN:-} ]]; then
    # lib.sh starts "$BIN/hub": point BIN at a directory holding this build as `hub`
    # (firmware-sim stays the one from BIN).
    ALT=$RESULTS/hub-bin
    mkdir -p "$ALT"
    ln -sf "$(readlink -f "$HUB_BIN")" "$ALT/hub"
    ln -sf "$SIM" "$ALT/firmware-sim"
    BIN=$ALT
fi

rss() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
kib_per() { awk -v a="$1" -v b="$2" -v n="$3" 'BEGIN { printf "%.2f", (b - a) / n }'; }

start_hub hub "$HUB_HTTP_PORT" "$HUB_MQTT_PORT"
sleep "$SETTLE"
rss_empty=$(rss "$HUB_PID")
log "hub $HUB_PID ready and empty: $rss_empty KiB"
common=(--scenario connections --devices "$N" --connect-inflight 100 --prefix bench-)
sim provision-hub --data-dir "$HUB_DIR" "${common[@]}" --hold 1s --hub-pid "$HUB_PID"
rss_provisioned=$(j provision-hub '.scenario.held.hub_rss_before_kib')

stop_pid "$HUB_PID"
start_hub hub "$HUB_HTTP_PORT" "$HUB_MQTT_PORT"
sleep "$SETTLE"
rss_registered=$(rss "$HUB_PID")
log "hub $HUB_PID restarted with $N devices registered: $rss_registered KiB"
sim held-hub --data-dir "$HUB_DIR" "${common[@]}" --hold "${HOLD}s" --hub-pid "$HUB_PID"
stop_pid "$HUB_PID"

start_mosquitto "$MOSQ_PORT"
sleep "$SETTLE"
rss_mosq_empty=$(rss "$MOSQ_PID")
sim held-mosquitto --target "mqtt://127.0.0.1:$MOSQ_PORT" "${common[@]}" --hold "${HOLD}s" --hub-pid "$MOSQ_PID"
stop_pid "$MOSQ_PID"

{
    echo "Measured $(date -u +%Y-%m-%dT%H:%MZ) with \`bench/memory.sh\` (N=$N, HOLD=$HOLD; hub $(readlink -f "$BIN/hub"),"
    echo "tree $(git -C "$ROOT" rev-parse --short HEAD 2> /dev/null || echo '?'); load $(cut -d' ' -f1-3 /proc/loadavg)); JSON in \`$RESULTS\`."
    echo
    echo "| | hub | Mosquitto |"
    echo "|---|---:|---:|"
    echo "| RSS empty, once ready (KiB) | $rss_empty | $rss_mosq_empty |"
    echo "| RSS after provisioning $N devices, same process (KiB) | $rss_provisioned | – |"
    echo "| **per registered device**, same process (KiB) | $(kib_per "$rss_empty" "$rss_provisioned" "$N") | – |"
    echo "| RSS after a restart, $N registered, none connected (KiB) | $rss_registered | – |"
    echo "| **per registered device**, after a restart (KiB) | $(kib_per "$rss_empty" "$rss_registered" "$N") | – |"
    row() { printf '| %s | %s | %s |\n' "$1" "$(jf held-hub "$2")" "$(jf held-mosquitto "$2")"; }
    row "held / open at the end" '"\(.scenario.held.held | int) / \(.scenario.held.open_after_hold | int)"'
    row "RSS before → held → end (KiB)" '"\(.scenario.held.hub_rss_before_kib | int) → \(.scenario.held.hub_rss_held_kib | int) → \(.scenario.held.hub_rss_end_kib | int)"'
    row "**RSS per idle connection** (KiB)" '.scenario.held.hub_kib_per_connection | ms'
} > "$OUT"
log "done; reports in $RESULTS"
