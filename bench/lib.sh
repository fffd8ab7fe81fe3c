# Shared by the bench/ scripts (sourced, not run): the binaries, a hub and a Mosquitto
# on loopback, waiting for a quiet machine, and running firmware-sim into a JSON file.
#
# Environment:
#   BIN        directory with `hub` and `firmware-sim` (default: target/release; needs
#              `cargo build --release -p hub -p firmware-sim`)
#   RESULTS    where the JSON reports and server logs go (default: a new temp dir, kept)
#   KEEP_DATA  1 keeps the hubs' data dirs (RESULTS/*.data) at the end; by default they
#              are removed: a run stores gigabytes of telemetry
#   QUIET      wait until the machine is less than 5 % busy for 3 s in a row before each
#              measured run, at most this many seconds (default 120; 0 = do not wait)
#   MOSQUITTO  the Mosquitto binary (default: mosquitto on PATH, else /usr/sbin/mosquitto)

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${BIN:-$ROOT/target/release}
case $BIN in /*) ;; *) BIN=$ROOT/$BIN ;; esac
RESULTS=${RESULTS:-$(mktemp -d -t firmware-sim-bench.XXXXXX)}
QUIET=${QUIET:-120}
SIM=$BIN/firmware-sim
PIDS=()

for tool in "$BIN/hub" "$SIM"; do
    [[ -x $tool ]] || { echo "no $tool: cargo build --release -p hub -p firmware-sim (or set BIN)" >&2; exit 1; }
done
command -v jq > /dev/null || { echo "jq is needed to read the reports: apt-get install jq" >&2; exit 1; }
if [[ -z ${MOSQUITTO:-} ]]; then
    MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
fi
[[ -x $MOSQUITTO ]] || { echo "no mosquitto: apt-get install mosquitto (or set MOSQUITTO)" >&2; exit 1; }
mkdir -p "$RESULTS"

bench_cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2> /dev/null || true; done
    wait 2> /dev/null || true
    if [[ ${KEEP_DATA:-0} != 1 ]]; then
        rm -rf "$RESULTS"/*.data
    fi
}
trap bench_cleanup EXIT

# Servers hold a socket per device: take the hard open-file limit.
ulimit -n "$(ulimit -Hn)" 2> /dev/null || true

log() { echo "bench: $*" >&2; }

# Waits until the machine is quiet (other developers build and measure here too).
wait_quiet() {
    [[ $QUIET -gt 0 ]] || return 0
    local deadline=$((SECONDS + QUIET)) calm=0 a b
    a=($(head -1 /proc/stat))
    while ((SECONDS < deadline)); do
        sleep 1
        b=($(head -1 /proc/stat))
        local total=0 idle i
        for i in 1 2 3 4 5 6 7 8; do total=$((total + b[i] - a[i])); done
        idle=$((b[4] - a[4] + b[5] - a[5]))
        a=("${b[@]}")
        if ((total > 0 && (total - idle) * 100 < 5 * total)); then
            calm=$((calm + 1))
            ((calm >= 3)) && return 0
        else
            calm=0
        fi
    done
    log "warning: the machine did not get quiet within ${QUIET}s; measuring anyway"
}

# start_hub NAME HTTP_PORT MQTT_PORT [serve args…] → HUB_PID, HUB_DIR; writes $RESULTS/NAME.pid.
# An existing data dir is reused (a restart).
start_hub() {
    local name=$1 http=$2 mqtt=$3
    shift 3
    HUB_DIR=$RESULTS/$name.data
    HUB_AMQPS=127.0.0.1:0 "$BIN/hub" serve --data-dir "$HUB_DIR" --http "127.0.0.1:$http" --mqtt "127.0.0.1:$mqtt" \
        --mqtts 127.0.0.1:0 "$@" > "$RESULTS/$name.out" 2>> "$RESULTS/$name.err" &
    HUB_PID=$!
    PIDS+=("$HUB_PID")
    local i
    for i in $(seq 300); do
        grep -q "hub ready" "$RESULTS/$name.out" 2> /dev/null && break
        kill -0 "$HUB_PID" 2> /dev/null || { cat "$RESULTS/$name.err" >&2; return 1; }
        sleep 0.1
    done
    grep -q "hub ready" "$RESULTS/$name.out" || { log "the hub did not start"; return 1; }
    echo "$HUB_PID" > "$RESULTS/$name.pid"
}

stop_pid() {
    kill -TERM "$1" 2> /dev/null || true
    wait "$1" 2> /dev/null || true
}

# start_mosquitto PORT [TLS_PORT CERTS_DIR] → MOSQ_PID. The configuration of
# docs/BENCHMARKS.md; with TLS_PORT a second listener speaks MQTT over TLS with
# CERTS_DIR's server.pem / server.key, signed by its ca.pem (the hub's data dir has
# them, for localhost).
start_mosquitto() {
    local port=$1 tls_port=${2:-} certs=${3:-}
    cat > "$RESULTS/mosquitto.conf" << CONF
listener $port 127.0.0.1
allow_anonymous true
max_connections -1
persistence false
log_dest stderr
log_type error
log_type warning
CONF
    if [[ -n $tls_port ]]; then
        printf 'listener %s 127.0.0.1\nmax_connections -1\ncafile %s\ncertfile %s\nkeyfile %s\n' \
            "$tls_port" "$certs/ca.pem" "$certs/server.pem" "$certs/server.key" >> "$RESULTS/mosquitto.conf"
    fi
    [[ $(id -u) -eq 0 ]] && echo "user root" >> "$RESULTS/mosquitto.conf"
    "$MOSQUITTO" -c "$RESULTS/mosquitto.conf" 2>> "$RESULTS/mosquitto.err" &
    MOSQ_PID=$!
    PIDS+=("$MOSQ_PID")
    local i
    for i in $(seq 100); do
        (echo > "/dev/tcp/127.0.0.1/$port") 2> /dev/null && break
        sleep 0.1
    done
    echo "$MOSQ_PID" > "$RESULTS/mosquitto.pid"
}

# sim NAME args… : runs firmware-sim --json into $RESULTS/NAME.json (stderr to NAME.log).
sim() {
    local name=$1
    shift
    wait_quiet
    log "$name: firmware-sim $*"
    if ! "$SIM" "$@" --json > "$RESULTS/$name.json" 2> "$RESULTS/$name.log"; then
        log "$name failed:"
        tail -5 "$RESULTS/$name.log" >&2
        echo '{}' > "$RESULTS/$name.json"
    fi
}

# j NAME JQ : a value of a report, `–` when absent.
j() {
    jq -r "($2) // \"–\"" "$RESULTS/$1.json" 2> /dev/null || echo "–"
}

# Formatting helpers for jq: integers with thousands separators, two decimals.
JQ_DEFS='def commas: if length <= 3 then . else (.[:-3] | commas) + "," + .[-3:] end;
def int: if type == "number" then (round | tostring | commas) else . end;
def ms: if type == "number" then (. * 100 | round / 100 | tostring) else . end;'
jf() {
    jq -r "$JQ_DEFS ($2) // \"–\"" "$RESULTS/$1.json" 2> /dev/null || echo "–"
}
