#!/usr/bin/env bash
# bench/compare.sh: lienthong side by side with RabbitMQ 3.10.8 (quorum queue) and
# NATS JetStream 2.15.1 (sync_interval: always) on this machine, plus raw disk probes.
#
#   bench/compare.sh                      # REPS=3, then: python3 bench/summarize.py
#
# Environment (all optional):
#   PEER_BENCH   peer-bench folder (read-only is fine; it is copied)  [<repo>/../shared/peer-bench]
#   REPS         repetitions                                           [3]
#   COUNT        documents/messages for 1 KiB, 256 in flight (our --count and the peers) [20000]
#   LARGE_COUNT  peer messages for 256 KiB, 256 in flight              [2000]
#   LAT_COUNT    peer messages for 1 KiB, 1 in flight (NATS latency)   [5000]
#   FSYNC_SECS   seconds per 1 KiB write+fdatasync probe               [5]
#   SEQ_MIB      MiB written by the sequential-write probe             [256]
#   MAX_SECS     per-run time bound passed to the peer load generator  [120]
#   OUR_TIMEOUT  seconds allowed for one `lienthong bench` run          [1800]
#   BENCH_CACHE  keeps the NATS 2.15.1 binary and the load generator build between runs
#                [${XDG_CACHE_HOME:-$HOME/.cache}/lienthong-bench]
#   RESULTS_DIR  where <timestamp>.jsonl goes                          [bench/results]
#   LIENTHONG_BIN  run this lienthong binary instead of building target/release/lienthong
#   KEEP_WORK=1  keep the temporary copy (server logs, data) after the run
#   FORCE_INSTALL=1  run peer-bench's install.sh even if the peers look installed
#
# TEST HOOK, never set it for a real comparison:
#   LIENTHONG_BENCH_FAKE=path/to.json  use that file as the output of `lienthong bench --json`
#   instead of building and running the binary; rows are marked "fake": true and
#   summarize.py prints a warning on top.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
PEER_BENCH=${PEER_BENCH:-$REPO_ROOT/../shared/peer-bench}
REPS=${REPS:-3}
COUNT=${COUNT:-20000}
LARGE_COUNT=${LARGE_COUNT:-2000}
LAT_COUNT=${LAT_COUNT:-5000}
FSYNC_SECS=${FSYNC_SECS:-5}
SEQ_MIB=${SEQ_MIB:-256}
MAX_SECS=${MAX_SECS:-120}
OUR_TIMEOUT=${OUR_TIMEOUT:-1800}
BENCH_CACHE=${BENCH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/lienthong-bench}
RESULTS_DIR=${RESULTS_DIR:-$SCRIPT_DIR/results}
FAKE=${LIENTHONG_BENCH_FAKE:-}

NATS_CFG=nats-2.15.1-sync-always
NATS_URL=127.0.0.1:4224
RABBIT_CFG=rabbitmq-3.10.8-quorum
RABBIT_URL='amqp://guest:guest@127.0.0.1:5672/%2f'

log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ -d "$PEER_BENCH" ] || die "peer-bench folder not found at $PEER_BENCH (set PEER_BENCH=...)"
PEER_BENCH=$(cd "$PEER_BENCH" && pwd)
if [ -n "$FAKE" ]; then
  [ -f "$FAKE" ] || die "LIENTHONG_BENCH_FAKE=$FAKE is not a file"
  FAKE=$(cd "$(dirname "$FAKE")" && pwd)/$(basename "$FAKE")
fi

T_START=$(date +%s)
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$RESULTS_DIR" "$BENCH_CACHE"
OUT=$RESULTS_DIR/$STAMP.jsonl
WORK=$(mktemp -d "${TMPDIR:-/tmp}/lienthong-compare.XXXXXX")
PB=$WORK/peer-bench
SERVERS_STARTED=0
OK=0
FAILED_RUNS=0

cleanup() {
  local rc=$?
  set +e
  if [ "$SERVERS_STARTED" = 1 ]; then
    log "stopping servers"
    (cd "$PB" && bash ./stop_all.sh) >>"$PB/logs/stop.log" 2>&1
    local f p
    for f in nats215a.pid rabbit.pid epmd.pid; do
      [ -f "$PB/$f" ] || continue
      p=$(cat "$PB/$f")
      for _ in $(seq 1 30); do kill -0 "$p" 2>/dev/null || break; sleep 0.5; done
      kill -0 "$p" 2>/dev/null && { log "pid $p ($f) still alive, sending KILL"; kill -9 "$p"; }
    done
  fi
  if [ "$OK" = 1 ] && [ "$FAILED_RUNS" = 0 ] && [ "${KEEP_WORK:-0}" != 1 ]; then
    rm -rf "$WORK"
  else
    log "work dir kept: $WORK (server logs in $PB/logs)"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Append one JSON object (stdin) to $OUT with extra fields; arguments are key=value,
# values are parsed as JSON when possible, else kept as strings.
emit() {
  python3 -c '
import json, sys, time
raw = sys.stdin.read()
try:
    d = json.loads(raw)
except ValueError:
    d = None
    for line in reversed(raw.splitlines()):
        try:
            d = json.loads(line)
            break
        except ValueError:
            pass
    if not isinstance(d, dict):
        sys.exit("not a JSON object: " + raw[:200])
for kv in sys.argv[2:]:
    k, v = kv.split("=", 1)
    try:
        d[k] = json.loads(v)
    except ValueError:
        d[k] = v
d.setdefault("t", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
with open(sys.argv[1], "a") as f:
    f.write(json.dumps(d) + "\n")
' "$OUT" "$@"
}

error_row() { # error_row side cfg test size inflight rep message
  printf '{"side":"%s","cfg":"%s","test":"%s","size":%s,"inflight":%s,"rep":%s,"error":"%s"}' \
    "$1" "$2" "$3" "$4" "$5" "$6" "$7" | emit
  FAILED_RUNS=$((FAILED_RUNS + 1))
  log "  FAILED: $2 $3 size=$4 inflight=$5: $7"
}

port_busy() { python3 -c 'import socket,sys; s=socket.socket(); s.settimeout(0.5); sys.exit(0 if s.connect_ex(("127.0.0.1", int(sys.argv[1]))) == 0 else 1)' "$1"; }
settle() { sync; sleep 1; }

# ---------------------------------------------------------------- copy + install
log "copying $PEER_BENCH -> $PB"
cp -r "$PEER_BENCH" "$PB"
chmod -R u+w "$PB"
rm -rf "$PB/loadgen/target" "$PB"/*.pid "$PB"/js* "$PB/logs" "$PB"/rabbitmq/{mnesia,log,home}
mkdir -p "$PB/logs"
LG_SRC=$BENCH_CACHE/loadgen-src   # stable build location: a per-run temp path would rebuild loadgen every time
export_loadgen_target() { export CARGO_TARGET_DIR="$BENCH_CACHE/loadgen-target"; }

installed() {
  dpkg-query -W -f='${Status}\n' nats-server rabbitmq-server 2>/dev/null | grep -c '^install ok installed$' | grep -qx 2 &&
    [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] &&
    [ -x "$BENCH_CACHE/nats-2.15/nats-server" ] &&
    "$BENCH_CACHE/nats-2.15/nats-server" --version 2>/dev/null | grep -q 'v2\.15\.1'
}
if [ "${FORCE_INSTALL:-0}" = 1 ] || ! installed; then
  log "peers not (fully) installed: running peer-bench install.sh (apt, pip download, cargo build; needs root)"
  t=$(date +%s)
  (cd "$PB" && export_loadgen_target && ./install.sh) >"$PB/logs/install.log" 2>&1 ||
    { tail -30 "$PB/logs/install.log" >&2; die "install.sh failed (log above)"; }
  mkdir -p "$BENCH_CACHE/nats-2.15"
  cp "$PB/nats-2.15/nats-server" "$BENCH_CACHE/nats-2.15/nats-server"
  log "install.sh done in $(( $(date +%s) - t )) s: $(tail -1 "$PB/logs/install.log")"
else
  log "peers already installed (apt packages + $BENCH_CACHE/nats-2.15/nats-server)"
  mkdir -p "$PB/nats-2.15"
  cp "$BENCH_CACHE/nats-2.15/nats-server" "$PB/nats-2.15/nats-server"
fi

# ---------------------------------------------------------------- builds
log "building peer load generator in $LG_SRC"
mkdir -p "$LG_SRC"
for f in Cargo.toml $(cd "$PB/loadgen" && find src -type f); do
  mkdir -p "$LG_SRC/$(dirname "$f")"
  cmp -s "$PB/loadgen/$f" "$LG_SRC/$f" || cp "$PB/loadgen/$f" "$LG_SRC/$f"
done
# keep the dependency versions of the first build (peer-bench ships no Cargo.lock)
if [ ! -f "$LG_SRC/Cargo.lock" ] && [ -f "$PB/loadgen/Cargo.lock" ]; then cp "$PB/loadgen/Cargo.lock" "$LG_SRC/"; fi
(cd "$LG_SRC" && export_loadgen_target && cargo build --release -q) >"$PB/logs/loadgen-build.log" 2>&1 ||
  { tail -30 "$PB/logs/loadgen-build.log" >&2; die "loadgen build failed"; }
LOADGEN=$BENCH_CACHE/loadgen-target/release/loadgen

if [ -n "$FAKE" ]; then
  log "TEST HOOK: LIENTHONG_BENCH_FAKE=$FAKE, our numbers are NOT measured; skipping our build"
  LIENTHONG=
elif [ -n "${LIENTHONG_BIN:-}" ]; then
  LIENTHONG=$LIENTHONG_BIN
  log "using prebuilt $LIENTHONG (LIENTHONG_BIN), not building"
  "$LIENTHONG" bench --help >/dev/null 2>&1 || die "$LIENTHONG has no working 'bench' subcommand"
else
  log "building lienthong (cargo build --release -p lienthong-cli)"
  (cd "$REPO_ROOT" && cargo build --release -p lienthong-cli) >"$PB/logs/lienthong-build.log" 2>&1 ||
    { tail -30 "$PB/logs/lienthong-build.log" >&2; die "lienthong build failed"; }
  LIENTHONG=${CARGO_TARGET_DIR:-$REPO_ROOT/target}/release/lienthong
  "$LIENTHONG" bench --help >/dev/null 2>&1 || die "$LIENTHONG has no working 'bench' subcommand"
fi

# ---------------------------------------------------------------- servers
for p in 4224 5672 25672; do
  if port_busy "$p"; then die "127.0.0.1:$p is already in use; stop whatever listens there first"; fi
done
# an epmd that is already running is reused by RabbitMQ (start-rabbit.sh's own loopback epmd then
# exits); harmless for the numbers, but it is not ours to stop, so say so.
if port_busy 4369; then log "note: an epmd is already listening on port 4369; RabbitMQ will register with it"; fi
SERVERS_STARTED=1
log "starting NATS 2.15.1 (sync_interval: always) on $NATS_URL"
(cd "$PB" && { ./nats-2.15/nats-server -c nats-2.15-always.conf >logs/nats-2.15-always.log 2>&1 & echo $! >nats215a.pid; })
log "starting RabbitMQ 3.10.8 on 127.0.0.1:5672"
(cd "$PB" && ./start-rabbit.sh)
for i in $(seq 1 60); do port_busy 4224 && break; sleep 0.5; done
port_busy 4224 || { tail -20 "$PB/logs/nats-2.15-always.log" >&2; die "NATS did not come up"; }
ready=0
for i in $(seq 1 90); do
  kill -0 "$(cat "$PB/rabbit.pid")" 2>/dev/null || break
  if (cd "$PB" && . ./rabbit-env.sh && timeout 10 /usr/lib/rabbitmq/bin/rabbitmqctl -q await_startup) >/dev/null 2>&1; then
    ready=1; break
  fi
  sleep 2
done
[ "$ready" = 1 ] || { tail -20 "$PB/logs/rabbit.out" >&2; die "RabbitMQ did not start"; }
log "servers up"

# ---------------------------------------------------------------- meta row
{
  python3 - "$REPS" "$COUNT" "$LARGE_COUNT" "$LAT_COUNT" "$FSYNC_SECS" "$SEQ_MIB" "${FAKE:-}" <<'PY'
import json, os, platform, sys
reps, count, large, lat, fsecs, seq, fake = sys.argv[1:8]
mem = ""
try:
    mem = open("/proc/meminfo").readline().split(":")[1].strip()
except OSError:
    pass
print(json.dumps({"kind": "meta", "reps": int(reps), "count": int(count), "large_count": int(large),
                  "lat_count": int(lat), "fsync_secs": float(fsecs), "seq_mib": int(seq),
                  "fake_ours": fake or None, "host": platform.node(), "kernel": platform.release(),
                  "cpus": os.cpu_count(), "mem": mem}))
PY
} | emit "repo_commit=$(git -C "$REPO_ROOT" rev-parse HEAD 2>/dev/null || echo unknown)" \
         "repo_dirty=$(git -C "$REPO_ROOT" status --porcelain -- . ':!bench' 2>/dev/null | grep -q . && echo true || echo false)" \
         "peer_bench=$PEER_BENCH" "work_dir=$WORK" \
         "nats_version=$("$PB/nats-2.15/nats-server" --version)" \
         "rabbitmq_version=$(dpkg-query -W -f='${Version}' rabbitmq-server)"

# ---------------------------------------------------------------- runs
run_disk() { # rep
  local mode line
  for mode in append overwrite; do
    settle
    log "rep $1: disk fsync probe ($mode, ${FSYNC_SECS}s)"
    if line=$(cd "$WORK" && python3 "$PB/fsync_probe.py" "$FSYNC_SECS" "$mode" "$WORK" 2>>"$PB/logs/disk.err"); then
      echo "$line" | emit side=disk cfg=disk "rep=$1"
    else error_row disk disk fsync-py 1024 1 "$1" "fsync_probe.py $mode failed"; fi
  done
  settle
  log "rep $1: disk sequential write (${SEQ_MIB} MiB + fdatasync)"
  if line=$(python3 "$SCRIPT_DIR/disk_probe.py" "$SEQ_MIB" "$WORK" 2>>"$PB/logs/disk.err"); then
    echo "$line" | emit side=disk cfg=disk "rep=$1"
  else error_row disk disk seq-write 1048576 1 "$1" "disk_probe.py failed"; fi
}

run_peer() { # rep side cfg kind url qtype size count inflight
  local rep=$1 side=$2 cfg=$3 kind=$4 url=$5 qtype=$6 size=$7 count=$8 inf=$9 line rc=0
  local extra=()
  [ -n "$qtype" ] && extra=(--qtype "$qtype")
  settle
  log "rep $rep: $cfg e2e size=$size inflight=$inf count=$count"
  line=$(timeout $((MAX_SECS + 80)) "$LOADGEN" "$kind-e2e" --url "$url" --size "$size" --count "$count" \
         --inflight "$inf" --max-secs "$MAX_SECS" --label "$cfg" "${extra[@]}" 2>>"$PB/logs/loadgen.err") || rc=$?
  if [ "$rc" = 0 ] && [ -n "$line" ]; then
    echo "$line" | emit "side=$side" "cfg=$cfg" "rep=$rep"
  else error_row "$side" "$cfg" e2e "$size" "$inf" "$rep" "loadgen rc=$rc"; fi
}

run_rabbit() {
  run_peer "$1" rabbitmq "$RABBIT_CFG" amqp "$RABBIT_URL" quorum 1024 "$COUNT" 256
  run_peer "$1" rabbitmq "$RABBIT_CFG" amqp "$RABBIT_URL" quorum 262144 "$LARGE_COUNT" 256
}

run_nats() {
  run_peer "$1" nats "$NATS_CFG" nats "$NATS_URL" "" 1024 "$COUNT" 256
  run_peer "$1" nats "$NATS_CFG" nats "$NATS_URL" "" 262144 "$LARGE_COUNT" 256
  run_peer "$1" nats "$NATS_CFG" nats "$NATS_URL" "" 1024 "$LAT_COUNT" 1
}

run_ours() { # rep
  local out rc=0
  settle
  if [ -n "$FAKE" ]; then
    log "rep $1: lienthong scenarios 1,2,3 (TEST HOOK: reading $FAKE)"
    out=$(cat "$FAKE") || rc=$?
    if [ "$rc" = 0 ] && echo "$out" | emit side=lienthong cfg=lienthong "rep=$1" fake=true; then
      return
    fi
  else
    log "rep $1: lienthong bench --json --scenarios 1,2,3 --count $COUNT --large-count $LARGE_COUNT --latency-count $LAT_COUNT"
    out=$(timeout "$OUR_TIMEOUT" "$LIENTHONG" bench --json --scenarios 1,2,3 --count "$COUNT" \
          --large-count "$LARGE_COUNT" --latency-count "$LAT_COUNT" \
          2>>"$PB/logs/lienthong-bench.err") || rc=$?
    if [ "$rc" = 0 ] && echo "$out" | emit side=lienthong cfg=lienthong "rep=$1" fake=false 2>>"$PB/logs/lienthong-bench.err"; then
      return
    fi
  fi
  error_row lienthong lienthong bench null null "$1" "lienthong bench rc=$rc (see $PB/logs/lienthong-bench.err)"
}

SIDES=(ours rabbit nats)
for rep in $(seq 1 "$REPS"); do
  run_disk "$rep"
  # rotate the side order so that no side always runs first: rep 1 = ours, rabbit, nats; rep 2 = rabbit, nats, ours; ...
  for k in 0 1 2; do
    side=${SIDES[$(( (rep - 1 + k) % 3 ))]}
    "run_$side" "$rep"
  done
done

echo "{\"kind\":\"end\",\"total_secs\":$(( $(date +%s) - T_START ))}" | emit
OK=1
log "done in $(( $(date +%s) - T_START )) s -> $OUT"
python3 "$SCRIPT_DIR/summarize.py" "$OUT" || log "summarize.py failed; results are still in $OUT"
