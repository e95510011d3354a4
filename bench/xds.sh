#!/usr/bin/env bash
# The xDS benchmark, as a section of docs/benchmarks.md on stdout: push fan-out of a change to S
# ADS subscribers against Signpost's own Watch fan-out to S watchers (interleaved, one change to
# each in turn, in the same run), and the time from a registration to the first call a Python
# grpcio xDS client routes to the new instance. The registry runs pinned to core 0 with the load
# on the other cores, then with nothing pinned.
#
#   bench/xds.sh BIN_DIR [--quick]
#
# Needs python3 with grpcio and grpcio-tools; bench/compare.sh calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$1
quick=false
[ "${2:-}" = "--quick" ] && quick=true
if $quick; then subscribers=100; changes=10; rounds=3; else subscribers=1000; changes=100; rounds=50; fi
python3 -c 'import grpc, grpc_tools' 2>/dev/null || {
  echo "bench/xds.sh needs python3 with grpcio and grpcio-tools (pip install grpcio-tools)" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

field() { sed -n "s/.*\"$2\":\([0-9.]*\).*/\1/p" <<<"$1"; }
ms() { awk -v a="$1" 'BEGIN { printf "%.2f", a }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }

cores=$(nproc)
# start MODE: a memory registry, pinned to core 0 (MODE pinned) or not; sets ADDR and PID.
start() {
  local cpu=()
  [ "$1" = pinned ] && cpu=(taskset -c 0)
  RUST_LOG=warn,signpost=info "${cpu[@]}" "$bin/signpost" serve --listen 127.0.0.1:0 --store memory \
    >/dev/null 2>"$work/registry.log" &
  PID=$!; pids+=("$PID")
  for _ in $(seq 100); do
    ADDR=$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$work/registry.log" | sed -n 1p)
    [ -n "$ADDR" ] && return
    sleep 0.1
  done
  echo "signpost did not start:" >&2; cat "$work/registry.log" >&2; exit 1
}
load() {
  local cpu=()
  [ "$mode" = pinned ] && [ "$cores" -ge 2 ] && cpu=(taskset -c "1-$((cores - 1))")
  "${cpu[@]}" "$bin/signpost-bench" "$@" --json
}

modes=(unpinned)
[ "$cores" -ge 2 ] && command -v taskset >/dev/null 2>&1 && modes=(pinned unpinned)

echo "## xDS"
echo
echo "The registry's ADS service against its own Watch: $subscribers ADS streams subscribed to one"
echo "service's endpoints (State of the World, each response ACKed) and $subscribers Watch streams on"
echo "another, over 4 connections each; $changes registrations to each service in turn, each timed"
echo "from sending the write to the moment every subscriber has it, and the next sent once the ADS"
echo "subscribers have ACKed it and a 20 ms pause is over. Then $rounds rounds of: register"
echo "a new greeter, time until the first call that Python grpcio (\`xds:///\` target, round robin,"
echo "one call at a time) routes to it."
echo
echo "| registry | ADS push p50 | ADS push p99 | Watch p50 | Watch p99 | ADS / Watch p99 (target ≤ 1.5) | server CPU per change, ADS / Watch | generator CPU per change, ADS / Watch | register → first xDS call p50 | p99 | max |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for mode in "${modes[@]}"; do
  start "$mode"
  f=$(load xds-fanout --target "signpost://$ADDR" --server-pid "$PID" -s "$subscribers" -k "$changes")
  c=$(load xds-first-call --target "signpost://$ADDR" --rounds "$rounds")
  echo "| $mode | $(ms "$(field "$f" xds_p50_ms)") ms | $(ms "$(field "$f" xds_p99_ms)") ms | $(ms "$(field "$f" watch_p50_ms)") ms | $(ms "$(field "$f" watch_p99_ms)") ms | $(ratio "$(field "$f" xds_p99_ms)" "$(field "$f" watch_p99_ms)") | $(ms "$(awk -v a="$(field "$f" server_cpu_us_per_xds_change)" 'BEGIN { print a / 1000 }')") / $(ms "$(awk -v a="$(field "$f" server_cpu_us_per_watch_change)" 'BEGIN { print a / 1000 }')") ms | $(ms "$(awk -v a="$(field "$f" client_cpu_us_per_xds_change)" 'BEGIN { print a / 1000 }')") / $(ms "$(awk -v a="$(field "$f" client_cpu_us_per_watch_change)" 'BEGIN { print a / 1000 }')") ms | $(ms "$(field "$c" p50_ms)") ms | $(ms "$(field "$c" p99_ms)") ms | $(ms "$(field "$c" max_ms)") ms |"
  kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true
done
echo
echo "A Watch stream's change is one message framed once and copied to every stream; an ADS push is"
echo "the service's whole endpoint set (encoded once per version, shared by every stream) in a"
echo "response per stream, then the stream's ACK. The first-call time includes grpcio's connection to"
echo "the new instance and its round robin reaching it. The generator's CPU is the load generator's"
echo "own (its gRPC clients decoding, ACKing and counting): where it is as high as the server's, the"
echo "push time is bounded by it as much as by the server."
