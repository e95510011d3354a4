#!/usr/bin/env bash
# Runs the benchmark workloads against Signpost's stores on this machine, in one run, and writes
# docs/benchmarks.md. The load generator and the servers share the machine's cores.
#
#   bench/compare.sh            # full run
#   bench/compare.sh --quick    # a few seconds, to check the harness works
set -euo pipefail
cd "$(dirname "$0")/.."

quick=false
[ "${1:-}" = "--quick" ] && quick=true
out=docs/benchmarks.md
$quick && out=$(mktemp)

cargo build --release --quiet -p signpost -p signpost-bench
bin=target/release
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# start NAME ARGS...: starts a server on a free loopback port in the background.
start() {
  local name=$1; shift
  RUST_LOG=warn,signpost=info "$bin/signpost" serve --listen 127.0.0.1:0 "$@" \
    >/dev/null 2>"$work/$name.log" &
  pids+=($!)
}

# address NAME: waits for the server's address in its log and prints it.
address() {
  local addr
  for _ in $(seq 100); do
    addr=$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$work/$1.log" | head -1)
    [ -n "$addr" ] && { echo "$addr"; return; }
    sleep 0.1
  done
  echo "server $1 did not start:" >&2; cat "$work/$1.log" >&2; exit 1
}

start memory --store memory
start durable --store durable --data-dir "$work/data"
memory=$(address memory)
durable=$(address durable)

if $quick; then
  writers=(1 16); n_one=200; n_many=2000; seconds=0.5; rounds=1; prop_rounds=5
else
  writers=(1 16 64); n_one=3000; n_many=20000; seconds=3; rounds=3; prop_rounds=200
fi
field() { sed -n "s/.*\"$2\":\([0-9.]*\).*/\1/p" <<<"$1"; }

{
  echo "# Benchmarks"
  echo
  echo "Produced by \`bench/compare.sh\` on $(date -u +%Y-%m-%d). Machine: $(nproc) cores,"
  echo "$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1), $(uname -sr)."
  echo "Signpost $("$bin/signpost" --version | cut -d' ' -f2), release build. The load generator and the"
  echo "server share the same cores, so these numbers are lower bounds for a server with a machine of its own."
  echo
  echo "## Register throughput: memory vs durable store"
  echo
  echo "\`signpost-bench register -c C -n N\`: C concurrent clients over 4 connections, each registering"
  echo "one instance at a time with its own 60 s lease (a lease grant and a put: two store mutations)."
  echo
  echo "| writers | memory (reg/s) | durable (reg/s) | durable / memory | memory p99 | durable p99 |"
  echo "|---:|---:|---:|---:|---:|---:|"
  for c in "${writers[@]}"; do
    n=$n_many; [ "$c" = 1 ] && n=$n_one
    m=$("$bin/signpost-bench" register --target "signpost://$memory" -c "$c" -n "$n" --json)
    d=$("$bin/signpost-bench" register --target "signpost://$durable" -c "$c" -n "$n" --json)
    mr=$(field "$m" per_second); dr=$(field "$d" per_second)
    ratio=$(awk -v a="$dr" -v b="$mr" 'BEGIN { printf "%.2f", a / b }')
    echo "| $c | $mr | $dr | $ratio | $(field "$m" p99_ms) ms | $(field "$d" p99_ms) ms |"
  done
  echo
  echo "Reading the numbers: with one writer every mutation waits for its own fsync, so the durable"
  echo "store runs at the disk's sync rate. With more writers, the commit thread writes everything queued"
  echo "in one transaction and one fsync (group commit), so throughput grows with concurrency while each"
  echo "change is still on disk before it is acknowledged. A registration with a ttl is two mutations (lease"
  echo "grant, then put), so it waits for two commits."
  echo
  echo "## The client crate's balanced channel"
  echo
  b=$("$bin/signpost-bench" balance --target "signpost://$memory" --callers 32 --seconds "$seconds" --rounds "$rounds" --json)
  echo "\`signpost-bench balance\`: 32 concurrent callers on one greeter backend, through a plain tonic"
  echo "\`Channel\` to it and through \`client.channel(..)\` balancing over the same backend; median of $rounds"
  echo "rounds of ${seconds} s each, alternating."
  echo
  echo "| plain channel (calls/s) | balanced channel (calls/s) | balanced / plain |"
  echo "|---:|---:|---:|"
  echo "| $(field "$b" plain_per_second) | $(field "$b" balanced_per_second) | $(field "$b" ratio) |"
  echo
  p=$("$bin/signpost-bench" propagation --target "signpost://$memory" --rounds "$prop_rounds" --json)
  echo "\`signpost-bench propagation\`: four callers keep a balanced channel busy; $prop_rounds times, a new backend"
  echo "registers (time to its first routed call) and then deregisters (time from the Deregister call to the"
  echo "last call it received)."
  echo
  echo "| | p50 | p99 |"
  echo "|---|---:|---:|"
  echo "| Register → first routed call | $(field "$p" register_to_first_p50_ms) ms | $(field "$p" register_to_first_p99_ms) ms |"
  echo "| Deregister → last routed call | $(field "$p" deregister_to_last_p50_ms) ms | $(field "$p" deregister_to_last_p99_ms) ms |"
  echo
  echo "Failed calls during the propagation run: $(field "$p" failed_calls)."
} > "$out"

cat "$out"
$quick && rm -f "$out"
exit 0
