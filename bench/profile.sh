#!/usr/bin/env bash
# CPU profile of one `lienthong bench` scenario, drawn as a flame graph.
#
# Starts `lienthong bench --scenarios N`, waits until its measurement runs, records every
# CPU of the machine with `perf record --call-graph dwarf` for SECONDS, and folds the
# stacks into an SVG with inferno (cargo install inferno). System-wide, so the broker,
# both agents and the driver all appear, each under its own process name.
#
# usage: bench/profile.sh SCENARIO OUT.svg [SECONDS=6] [extra bench flags...]
#   env: LIENTHONG (default target/release/lienthong), PERF (default perf),
#        INFERNO_BIN (folder with inferno-collapse-perf and inferno-flamegraph)
set -euo pipefail

scenario=${1:?scenario number}
out=${2:?output svg}
seconds=${3:-6}
shift $(( $# >= 3 ? 3 : $# ))
bin=${LIENTHONG:-target/release/lienthong}
perf=${PERF:-perf}
inferno=${INFERNO_BIN:-$HOME/.cargo/bin}
work=$(mktemp -d)
trap 'kill "$bench_pid" 2>/dev/null || true; rm -rf "$work"' EXIT

case $scenario in
  1) flags=(--count 40000) ;;
  2) flags=(--latency-count 4000) ;;
  3) flags=(--large-count 3000) ;;
  *) flags=() ;;
esac
"$bin" bench --scenarios "$scenario" "${flags[@]}" "$@" >"$work/bench.out" 2>"$work/bench.err" &
bench_pid=$!
# The measurement starts once the warm-up document arrived: the bench then prints the
# scenario's first line; give the pipeline two seconds to reach its steady state.
until grep -q "scenario $scenario: .* in flight\|scenario $scenario: .*documents of" "$work/bench.err" 2>/dev/null; do
  kill -0 "$bench_pid" 2>/dev/null || { cat "$work/bench.err" >&2; exit 1; }
  sleep 0.2
done
sleep 4
"$perf" record -a -F 199 --call-graph dwarf,16384 -o "$work/perf.data" -- sleep "$seconds" 2>"$work/perf.err"
# The three children are all called `lienthong`: name each by its role instead.
roles=()
while read -r pid args; do
  case $args in
    *" broker "*) roles+=("-e" "s/^[^;]*-$pid;/broker;/") ;;
    *" agent "*"--agency 000.00.00.H31"*) roles+=("-e" "s/^[^;]*-$pid;/sender-agent;/") ;;
    *" agent "*) roles+=("-e" "s/^[^;]*-$pid;/recipient-agent;/") ;;
  esac
done < <(ps -o pid=,args= --ppid "$bench_pid")
roles+=("-e" "s/^[^;]*-$bench_pid;/bench-driver;/")
"$perf" script -F +pid -i "$work/perf.data" 2>/dev/null \
  | "$inferno/inferno-collapse-perf" --all --pid \
  | sed "${roles[@]}" > "$work/folded"
"$inferno/inferno-flamegraph" --minwidth 0.25 \
  --title "lienthong bench scenario $scenario: all CPUs, ${seconds} s ($(date -u +%FT%TZ))" \
  < "$work/folded" > "$out"
cp "$work/folded" "${out%.svg}.folded"
# Shares per process, for the docs.
awk '{ n = $NF; p = $0; sub(/;.*/, "", p); c[p] += n; t += n }
     END { for (k in c) printf "%6.1f%%  %s\n", 100 * c[k] / t, k }' "$work/folded" | sort -rn | head -12
# The profile is what this script is for; the bench's own figures come from its runs.
kill "$bench_pid" 2>/dev/null || true
