#!/usr/bin/env bash
# Time from `hub serve` to "hub ready" with a lot of telemetry retained (issue 28):
# fills a data dir through the hub's own ingest path (firmware-sim, QoS 1, 16 KiB
# messages, so the records are written by the real segment writer and committer),
# stops the hub cleanly, then starts each build ROUNDS times on that data dir, with
# the page cache warm and cold (`echo 3 > /proc/sys/vm/drop_caches`, needs root), after
# a clean stop (SIGTERM) and after a SIGKILL. Prints one line per start; removes the
# data dir at the end (KEEP_DATA=1 keeps it, e.g. for bench/standard.sh's storm).
#
#   cargo build --release -p hub -p firmware-sim
#   bench/restart.sh GB ROUNDS LABEL=HUB_BINARY...
#   e.g. bench/restart.sh 8 3 old=/tmp/hub-1f2a478 new=target/release/hub
#
# The first LABEL's binary fills the data dir. DATA (default: a new dir under /tmp)
# names the data dir; an existing one that already holds GB is reused without
# filling. SIM (default target/release/firmware-sim). Ports are chosen by the hub.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIM=${SIM:-$ROOT/target/release/firmware-sim}
GB=$1; ROUNDS=$2; shift 2
DATA=${DATA:-$(mktemp -d -t hub-restart.XXXXXX)/data}
WORK=$(mktemp -d)
cleanup() {
    [[ -n ${HUB_PID:-} ]] && kill "$HUB_PID" 2> /dev/null && wait "$HUB_PID" 2> /dev/null
    rm -rf "$WORK"
    if [[ ${KEEP_DATA:-0} != 1 ]]; then rm -rf "$DATA"; fi
}
trap cleanup EXIT
# Keep everything: retention must not delete what is being measured.
printf '[telemetry]\nretention_bytes = %d\nretention_secs = 604800\n' $(((GB + 4) << 30)) > "$WORK/hub.toml"

start() { # binary → HUB_PID; the seconds until it printed "hub ready" go to $WORK/ready
    python3 - "$1" "$DATA" "$WORK/hub.toml" "$WORK" << 'PY'
import os, subprocess, sys, time
binary, data, config, work = sys.argv[1:]
env = dict(os.environ, HUB_AMQPS="127.0.0.1:0")
out = os.path.join(work, "hub.out")
t0 = time.monotonic()
hub = subprocess.Popen([binary, "serve", "--data-dir", data, "--config", config, "--http", "127.0.0.1:0",
                        "--mqtt", "127.0.0.1:0", "--mqtts", "127.0.0.1:0"],
                       stdout=open(out, "w"), stderr=open(os.path.join(work, "hub.err"), "a"), env=env)
while True:
    with open(out) as f:
        if "hub ready" in f.read():
            break
    if hub.poll() is not None:
        sys.exit("the hub exited before it was ready")
    time.sleep(0.002)
open(os.path.join(work, "ready"), "w").write(f"{time.monotonic() - t0:.3f}")
open(os.path.join(work, "hub.pid"), "w").write(str(hub.pid))
PY
    HUB_PID=$(cat "$WORK/hub.pid")
}
stop() { # TERM or KILL
    kill "-$1" "$HUB_PID" 2> /dev/null || true
    while kill -0 "$HUB_PID" 2> /dev/null; do sleep 0.05; done
    HUB_PID=
}
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }
size_gb() { du -s --block-size=1G "$DATA/telemetry" 2> /dev/null | cut -f1 || echo 0; }

first=${1#*=}
if (($(size_gb) < GB)); then
    echo "filling $DATA with ${GB} GB of telemetry ($first)" >&2
    start "$first"
    while (($(size_gb) < GB)); do
        "$SIM" --data-dir "$DATA" --hub-bin "$first" --devices 50 --inflight 8 --qos 1 --rate max \
            --payload 16384 --duration 20s --prefix fill- > /dev/null 2>&1
        echo "  $(size_gb) GB" >&2
    done
    stop TERM
fi
echo "retained: $(du -sh "$DATA/telemetry" | cut -f1) in $(find "$DATA/telemetry" -name '*.log' | wc -l) segments; load: $(uptime | sed 's/.*load/load/')"
for round in $(seq "$ROUNDS"); do
    for spec in "$@"; do
        label=${spec%%=*} binary=${spec#*=}
        # After a clean stop (the previous start ended with SIGTERM), warm then cold.
        start "$binary"; warm=$(cat "$WORK/ready"); stop TERM
        cold; start "$binary"; cold_s=$(cat "$WORK/ready"); stop KILL
        # After a SIGKILL: the last segment of each partition is walked.
        start "$binary"; killed=$(cat "$WORK/ready"); stop KILL
        cold; start "$binary"; killed_cold=$(cat "$WORK/ready"); stop TERM
        printf '%-8s round %d  ready after a clean stop: warm %6.3f s  cold %6.3f s   after a SIGKILL: warm %6.3f s  cold %6.3f s\n' \
            "$label" "$round" "$warm" "$cold_s" "$killed" "$killed_cold"
    done
done
