#!/usr/bin/env bash
# Runs every workload of signpost-bench against Signpost (memory and durable stores) and against
# etcd used as a registry, on this machine, in one run, and writes docs/benchmarks.md.
#
#   bench/compare.sh            # full run (about ten minutes on two cores)
#   bench/compare.sh --quick    # a few seconds per workload, to check the harness works
#
# Needs etcd, nginx, wrk and h2load for the gateway section, dnsperf and nsd for the DNS section
# (Debian: etcd-server nginx wrk nghttp2-client dnsperf nsd), installed with apt-get when missing
# and run as root; and python3 with grpcio and grpcio-tools for the xDS section (bench/xds.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

quick=false
[ "${1:-}" = "--quick" ] && quick=true
out=docs/benchmarks.md
$quick && out=$(mktemp)

need=()
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
# The gateway section (bench/gateway.sh).
command -v nginx >/dev/null 2>&1 || need+=(nginx)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
command -v curl >/dev/null 2>&1 || need+=(curl)
# The DNS section (bench/dns.sh).
command -v dnsperf >/dev/null 2>&1 || need+=(dnsperf)
[ -x /usr/sbin/nsd ] || command -v nsd >/dev/null 2>&1 || need+=(nsd)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "bench/compare.sh needs ${need[*]} (apt-get install -y ${need[*]})" >&2
    exit 1
  fi
  apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo build --release --quiet -p signpost
cargo build --release --quiet -p signpost-bench --features etcd
# The failover workload's backends are greeter-server processes.
cargo build --release --quiet -p signpost-examples --bin greeter-server
bin=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# With two or more cores, servers run on core 0 and the load generator on the others, so each
# server gets the same single core and the generator does not steal from it.
cores=$(nproc)
if [ "$cores" -ge 2 ] && command -v taskset >/dev/null 2>&1; then
  server_cpu=(taskset -c 0); load_cpu=(taskset -c "1-$((cores - 1))")
  pinning="servers pinned to core 0, the load generator to cores 1-$((cores - 1)) (taskset)"
else
  server_cpu=(); load_cpu=()
  pinning="no pinning (one core, or no taskset)"
fi

# free_ports N: N free ports, held together while chosen so that no two are the same.
free_ports() {
  python3 -c 'import socket, sys
held = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in held: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in held))' "$1"
}

# start_signpost NAME ARGS...: a server on a free port; sets ADDR and PID.
start_signpost() {
  local name=$1; shift
  RUST_LOG=warn,signpost=info "${server_cpu[@]}" "$bin/signpost" serve --listen 127.0.0.1:0 "$@" \
    >/dev/null 2>"$work/$name.log" &
  PID=$!; pids+=("$PID")
  for _ in $(seq 100); do
    ADDR=$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$work/$name.log" | sed -n 1p)
    [ -n "$ADDR" ] && return
    sleep 0.1
  done
  echo "signpost $name did not start:" >&2; cat "$work/$name.log" >&2; exit 1
}

# start_etcd NAME: a single-member etcd on free ports; sets ADDR and PID.
start_etcd() {
  local name=$1 client peer attempt
  # A port found free can be taken by something else before etcd binds it; etcd then exits at
  # once, and starts again on other ports.
  for attempt in 1 2 3; do
    read -r client peer < <(free_ports 2)
    rm -rf "${work:?}/$name"
    "${server_cpu[@]}" etcd --name "$name" --data-dir "$work/$name" \
      --listen-client-urls "http://127.0.0.1:$client" --advertise-client-urls "http://127.0.0.1:$client" \
      --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
      --initial-cluster "$name=http://127.0.0.1:$peer" >"$work/$name.log" 2>&1 &
    PID=$!; pids+=("$PID")
    ADDR=127.0.0.1:$client
    for _ in $(seq 100); do
      grep -q "ready to serve client requests" "$work/$name.log" && return
      kill -0 "$PID" 2>/dev/null || break
      sleep 0.1
    done
    grep -q "address already in use" "$work/$name.log" || break
    echo "etcd found a port taken (attempt $attempt), starting it on others" >&2
  done
  echo "etcd did not start:" >&2; cat "$work/$name.log" >&2; exit 1
}

stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# One retry, written into the results: a run that fails twice stops the script.
bench() {
  "${load_cpu[@]}" "$bin/signpost-bench" "$@" --json || {
    echo "retrying: signpost-bench $*" >&2
    echo "- \`signpost-bench $*\` failed once and was run again." >>"$work/retries"
    sleep 2
    "${load_cpu[@]}" "$bin/signpost-bench" "$@" --json
  }
}
field() { sed -n "s/.*\"$2\":\([0-9.]*\).*/\1/p" <<<"$1"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
num() { awk -v a="$1" 'BEGIN { printf "%.0f", a }'; }
ms() { awk -v a="$1" 'BEGIN { printf "%.2f", a }'; }

if $quick; then
  writers=(1 16); n_one=200; n_many=2000; seconds=1; watchers=(100); changes=10
  leases=200; scales=("2000 200"); prop_rounds=5; bal_seconds=0.5; bal_rounds=1
  fo_rounds=1; fo_warmup=0.5
else
  writers=(1 16 64); n_one=2000; n_many=20000; seconds=5; watchers=(1000 10000); changes=100
  leases=1000; scales=("1000 100" "100000 10000"); prop_rounds=200; bal_seconds=3; bal_rounds=3
  fo_rounds=8; fo_warmup=1
fi

start_signpost memory --store memory; mem=$ADDR; mem_pid=$PID
start_signpost durable --store durable --data-dir "$work/data"; dur=$ADDR; dur_pid=$PID
start_etcd etcd; etcd=$ADDR; etcd_pid=$PID
start_signpost onetcd --store etcd --etcd-endpoints "http://$etcd" --etcd-prefix /signpost-bench/; onetcd=$ADDR; onetcd_pid=$PID

etcd_version=$(etcd --version 2>/dev/null | sed -n 1p)
{
  echo "# Benchmarks"
  echo
  echo "Produced by \`bench/compare.sh\` on $(date -u +%Y-%m-%d): Signpost and etcd used as a registry, through"
  echo "the same workloads of \`signpost-bench\`, on the same machine, in the same run."
  echo
  echo "- Machine: $cores cores, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | sed -n 1p), $(uname -sr)."
  echo "- Signpost $("$bin/signpost" --version | cut -d' ' -f2) (release build); ${etcd_version}."
  echo "- The load generator shares the machine with the servers: $pinning. Every figure is"
  echo "  therefore also a measure of the generator; ratios between targets are the point."
  echo "- Server CPU per request is the server process's user+system time from /proc over the measured"
  echo "  stretch, divided by the requests served."
  echo "- etcd as a registry: a lease per instance, a key per instance under a prefix, prefix range reads"
  echo "  (serializable unless noted) and prefix watches; values are the protobuf-encoded instance."
  echo
  echo "## Register"
  echo
  echo "C concurrent clients over 4 connections, each registering one instance at a time with its own"
  echo "60 s lease (Signpost: Register with a ttl; etcd: lease grant, then put on the lease)."
  echo
  echo "| writers | memory (reg/s) | durable (reg/s) | etcd (reg/s) | memory / etcd | durable / etcd | durable / memory | p99 memory / durable / etcd | server CPU per reg, memory / durable / etcd |"
  echo "|---:|---:|---:|---:|---:|---:|---:|---|---|"
  for c in "${writers[@]}"; do
    n=$n_many; [ "$c" = 1 ] && n=$n_one
    m=$(bench register --target "signpost://$mem" --server-pid "$mem_pid" -c "$c" -n "$n")
    d=$(bench register --target "signpost://$dur" --server-pid "$dur_pid" -c "$c" -n "$n")
    e=$(bench register --target "etcd://$etcd" --server-pid "$etcd_pid" -c "$c" -n "$n")
    mr=$(field "$m" per_second); dr=$(field "$d" per_second); er=$(field "$e" per_second)
    echo "| $c | $(num "$mr") | $(num "$dr") | $(num "$er") | $(ratio "$mr" "$er") | $(ratio "$dr" "$er") | $(ratio "$dr" "$mr") | $(ms "$(field "$m" p99_ms)") / $(ms "$(field "$d" p99_ms)") / $(ms "$(field "$e" p99_ms)") ms | $(num "$(field "$m" server_cpu_us)") / $(num "$(field "$d" server_cpu_us)") / $(num "$(field "$e" server_cpu_us)") µs |"
  done
  echo
  echo "With one writer every durable mutation waits for its own fsync; with more, the commit thread"
  echo "writes everything queued in one transaction and one fsync (group commit). A registration with a"
  echo "ttl is two mutations (lease grant, then put), so it waits for two commits."
  echo
  echo "## Discover"
  echo
  echo "10 services of 100 instances (about 23 KB per answer), 64 concurrent callers on random services"
  echo "for ${seconds} s after a warm-up."
  echo
  echo "| target | calls/s | p50 | p99 | server CPU per call | vs etcd (serializable): calls/s, CPU, p99 |"
  echo "|---|---:|---:|---:|---:|---|"
  es=$(bench discover --target "etcd://$etcd" --server-pid "$etcd_pid" --seconds "$seconds")
  el=$(bench discover --target "etcd://$etcd" --server-pid "$etcd_pid" --seconds "$seconds" --linearizable)
  m=$(bench discover --target "signpost://$mem" --server-pid "$mem_pid" --seconds "$seconds")
  d=$(bench discover --target "signpost://$dur" --server-pid "$dur_pid" --seconds "$seconds")
  for row in "Signpost memory|$m" "Signpost durable|$d" "etcd serializable|$es" "etcd linearizable|$el"; do
    name=${row%%|*}; r=${row#*|}
    echo "| $name | $(num "$(field "$r" per_second)") | $(ms "$(field "$r" p50_ms)") ms | $(ms "$(field "$r" p99_ms)") ms | $(num "$(field "$r" server_cpu_us)") µs | $(ratio "$(field "$r" per_second)" "$(field "$es" per_second)")x, $(ratio "$(field "$r" server_cpu_us)" "$(field "$es" server_cpu_us)")x, $(ratio "$(field "$r" p99_ms)" "$(field "$es" p99_ms)")x |"
  done
  echo
  echo "## Watch fan-out"
  echo
  echo "W watch streams on one service over 4 connections; for each of $changes changes, the time from"
  echo "sending the write to the moment every watcher has it."
  echo
  echo "| watchers | target | p50 | p99 | max | p99 vs etcd | server RSS after |"
  echo "|---:|---|---:|---:|---:|---:|---:|"
  for w in "${watchers[@]}"; do
    e=$(bench watch --target "etcd://$etcd" --server-pid "$etcd_pid" -w "$w" -k "$changes")
    m=$(bench watch --target "signpost://$mem" --server-pid "$mem_pid" -w "$w" -k "$changes")
    d=$(bench watch --target "signpost://$dur" --server-pid "$dur_pid" -w "$w" -k "$changes")
    for row in "Signpost memory|$m" "Signpost durable|$d" "etcd|$e"; do
      name=${row%%|*}; r=${row#*|}
      echo "| $w | $name | $(ms "$(field "$r" p50_ms)") ms | $(ms "$(field "$r" p99_ms)") ms | $(ms "$(field "$r" max_ms)") ms | $(ratio "$(field "$r" p99_ms)" "$(field "$e" p99_ms)") | $(num "$(field "$r" server_rss_mib)") MiB |"
    done
  done
  echo
  echo "## Signpost on etcd"
  echo
  echo "The same workloads through a Signpost server running \`--store etcd\` and directly against the"
  echo "etcd it uses (the same etcd process as above; Signpost and etcd both on core 0)."
  echo
  echo "| workload | Signpost on etcd | etcd directly | Signpost on etcd / etcd |"
  echo "|---|---:|---:|---:|"
  c=${writers[-1]}
  s=$(bench register --target "signpost://$onetcd" --server-pid "$onetcd_pid" -c "$c" -n "$n_many")
  e=$(bench register --target "etcd://$etcd" --server-pid "$etcd_pid" -c "$c" -n "$n_many")
  echo "| Register, $c writers (reg/s) | $(num "$(field "$s" per_second)") | $(num "$(field "$e" per_second)") | $(ratio "$(field "$s" per_second)" "$(field "$e" per_second)") |"
  echo "| Register p99 | $(ms "$(field "$s" p99_ms)") ms | $(ms "$(field "$e" p99_ms)") ms | $(ratio "$(field "$s" p99_ms)" "$(field "$e" p99_ms)") |"
  s=$(bench discover --target "signpost://$onetcd" --server-pid "$onetcd_pid" --seconds "$seconds")
  e=$(bench discover --target "etcd://$etcd" --server-pid "$etcd_pid" --seconds "$seconds")
  echo "| Discover (calls/s) | $(num "$(field "$s" per_second)") | $(num "$(field "$e" per_second)") | $(ratio "$(field "$s" per_second)" "$(field "$e" per_second)") |"
  echo "| Discover p99 | $(ms "$(field "$s" p99_ms)") ms | $(ms "$(field "$e" p99_ms)") ms | $(ratio "$(field "$s" p99_ms)" "$(field "$e" p99_ms)") |"
  w=${watchers[0]}
  s=$(bench watch --target "signpost://$onetcd" --server-pid "$onetcd_pid" -w "$w" -k "$changes")
  e=$(bench watch --target "etcd://$etcd" --server-pid "$etcd_pid" -w "$w" -k "$changes")
  echo "| Watch fan-out to $w watchers, p99 | $(ms "$(field "$s" p99_ms)") ms | $(ms "$(field "$e" p99_ms)") ms | $(ratio "$(field "$s" p99_ms)" "$(field "$e" p99_ms)") |"
  echo
  echo "Signpost on etcd answers Discover from the replica its one etcd watch keeps, so a read costs etcd"
  echo "nothing; a registration is an etcd lease grant and a transaction, then the wait for the change to"
  echo "come back on the watch (so that the server that took it can read it at once)."
  echo
  echo "## KeepAlive"
  echo
  echo "$leases leases, each holding one instance, refreshed as fast as 64 streams can (one request in"
  echo "flight per stream) for ${seconds} s. A spurious expiry is a refresh answered \"expired\"; a lost"
  echo "instance is one missing afterwards. (etcd-client opens one stream per lease; Signpost's streams"
  echo "carry many leases each. Signpost on etcd answers a refresh that follows another of the same lease"
  echo "within a second, or a tenth of its ttl, from etcd's answer to that one, so this workload costs etcd"
  echo "about one renew per lease per second.)"
  echo
  echo "| target | refreshes/s | vs etcd | spurious expiries | instances lost | server CPU per refresh |"
  echo "|---|---:|---:|---:|---:|---:|"
  e=$(bench keepalive --target "etcd://$etcd" --server-pid "$etcd_pid" --leases "$leases" --seconds "$seconds")
  m=$(bench keepalive --target "signpost://$mem" --server-pid "$mem_pid" --leases "$leases" --seconds "$seconds")
  d=$(bench keepalive --target "signpost://$dur" --server-pid "$dur_pid" --leases "$leases" --seconds "$seconds")
  o=$(bench keepalive --target "signpost://$onetcd" --server-pid "$onetcd_pid" --leases "$leases" --seconds "$seconds")
  for row in "Signpost memory|$m" "Signpost durable|$d" "Signpost on etcd|$o" "etcd|$e"; do
    name=${row%%|*}; r=${row#*|}
    echo "| $name | $(num "$(field "$r" per_second)") | $(ratio "$(field "$r" per_second)" "$(field "$e" per_second)") | $(num "$(field "$r" spurious_expiries)") | $(num "$(field "$r" instances_lost)") | $(num "$(field "$r" server_cpu_us)") µs |"
  done
  echo
  echo "## Scale"
  echo
  echo "A fresh server of each kind: N instances, each on its own lease, 100 to a service; then watch"
  echo "streams spread over the services (10 per service); then Discover p99 (16 callers, 3 s, random"
  echo "services) and the fan-out p99 of changes to watched services."
  echo
  echo "| instances | watchers | target | load time | RSS loaded | RSS with watchers | Discover p99 | fan-out p99 |"
  echo "|---:|---:|---|---:|---:|---:|---:|---:|"
  for pair in "${scales[@]}"; do
    read -r n w <<<"$pair"
    stop "$mem_pid"; stop "$dur_pid"; stop "$onetcd_pid"; stop "$etcd_pid"
    start_signpost memory2 --store memory; mem=$ADDR; mem_pid=$PID
    start_signpost durable2 --store durable --data-dir "$work/data-scale-$n"; dur=$ADDR; dur_pid=$PID
    start_etcd "etcd-scale-$n"; etcd=$ADDR; etcd_pid=$PID
    for row in "Signpost memory|signpost://$mem|$mem_pid" "Signpost durable|signpost://$dur|$dur_pid" "etcd|etcd://$etcd|$etcd_pid"; do
      IFS='|' read -r name target pid <<<"$row"
      r=$(bench scale --target "$target" --server-pid "$pid" --instances "$n" --watchers "$w")
      echo "| $n | $w | $name | $(ms "$(field "$r" load_seconds)") s | $(num "$(field "$r" rss_loaded_mib)") MiB | $(num "$(field "$r" rss_with_watchers_mib)") MiB | $(ms "$(field "$r" discover_p99_ms)") ms | $(ms "$(field "$r" fanout_p99_ms)") ms |"
    done
  done
  echo
  echo "## The client crate's balanced channel"
  echo
  b1=$(bench balance --target "signpost://$mem" --callers 32 --backends 1 --seconds "$bal_seconds" --rounds "$bal_rounds")
  b3=$(bench balance --target "signpost://$mem" --callers 32 --backends 3 --seconds "$bal_seconds" --rounds "$bal_rounds")
  echo "\`signpost-bench balance\`: 32 concurrent callers on greeter backends, in turn through a plain tonic"
  echo "\`Channel\` to the first backend, through \`client.channel(..)\` (ours) balancing over the registered"
  echo "backends, and through tonic's \`Channel::balance_channel\` fed the same backends with"
  echo "\`Change::Insert\`; median of $bal_rounds rounds of ${bal_seconds} s each, the order rotated every round."
  echo "The greeters run in the load generator's process."
  echo
  echo "| backends | plain channel (calls/s) | ours (calls/s) | tonic balance_channel (calls/s) | ours / plain | ours / tonic |"
  echo "|---:|---:|---:|---:|---:|---:|"
  for row in "1|$b1" "3|$b3"; do
    n=${row%%|*}; r=${row#*|}
    echo "| $n | $(num "$(field "$r" plain_per_second)") | $(num "$(field "$r" ours_per_second)") | $(num "$(field "$r" tonic_balance_per_second)") | $(field "$r" ours_vs_plain) | $(field "$r" ours_vs_tonic_balance) |"
  done
  echo
  echo "With three backends the plain channel still goes to one of them: its column is a reference, not a"
  echo "like-for-like figure."
  echo
  p=$(bench propagation --target "signpost://$mem" --rounds "$prop_rounds")
  echo "\`signpost-bench propagation\`: four callers keep a balanced channel busy; $prop_rounds times, a new"
  echo "backend registers (time to its first routed call) and then deregisters (time from the Deregister"
  echo "call to the last call it received)."
  echo
  echo "| | p50 | p99 |"
  echo "|---|---:|---:|"
  echo "| Register → first routed call | $(ms "$(field "$p" register_to_first_p50_ms)") ms | $(ms "$(field "$p" register_to_first_p99_ms)") ms |"
  echo "| Deregister → last routed call | $(ms "$(field "$p" deregister_to_last_p50_ms)") ms | $(ms "$(field "$p" deregister_to_last_p99_ms)") ms |"
  echo
  echo "Failed calls during the propagation run: $(num "$(field "$p" failed_calls)")."
  echo
  f=$(bench failover --target "signpost://$mem" --greeter-server "$bin/greeter-server" --rounds "$fo_rounds" --warmup "$fo_warmup" --ttl-secs 2)
  echo "\`signpost-bench failover\`: 32 concurrent callers on three \`greeter-server\` processes registered with"
  echo "a 2 s lease; after ${fo_warmup} s of calls one of them is killed with SIGKILL (it neither deregisters"
  echo "nor closes its connections cleanly). $fo_rounds rounds; each round runs ours, then tonic's"
  echo "\`balance_channel\` fed Insert/Remove from \`Client::watch\` on the same registry, each on three fresh"
  echo "processes and never both at once. A phase ends 250 ms after the registry expired the dead"
  echo "instance's lease. Times are from the kill; \"not Ready\" is the killed endpoint's state in"
  echo "\`stats()\`, \"in flight\" its \`in_flight\` just before the kill (ours only: tonic does not say)."
  echo
  echo "| | ours | tonic balance_channel |"
  echo "|---|---:|---:|"
  echo "| calls | $(num "$(field "$f" ours_calls)") | $(num "$(field "$f" tonic_calls)") |"
  echo "| failed calls, all rounds (most in one round) | $(num "$(field "$f" ours_failed_total)") ($(num "$(field "$f" ours_failed_max)")) | $(num "$(field "$f" tonic_failed_total)") ($(num "$(field "$f" tonic_failed_max)")) |"
  echo "| in flight on the killed backend at the kills, all rounds | $(num "$(field "$f" ours_in_flight_at_kill_total)") | - |"
  echo "| kill → endpoint no longer Ready, p50 / p99 | $(ms "$(field "$f" ours_left_ready_p50_ms)") / $(ms "$(field "$f" ours_left_ready_p99_ms)") ms | - |"
  echo "| kill → last failed call, p50 / p99 | $(ms "$(field "$f" ours_last_failure_p50_ms)") / $(ms "$(field "$f" ours_last_failure_p99_ms)") ms | $(ms "$(field "$f" tonic_last_failure_p50_ms)") / $(ms "$(field "$f" tonic_last_failure_p99_ms)") ms |"
  echo
  echo "Kill → the registry dropped the instance (lease expiry), p50 / p99: $(ms "$(field "$f" registry_removal_p50_ms)") / $(ms "$(field "$f" registry_removal_p99_ms)") ms."
  echo "tonic's balancer keeps an endpoint whose connection broke and fails the calls it picks for it"
  echo "until the registry removes the instance; ours stops picking it when its connection goes."
  echo "Ours may fail a few more calls than were in flight: those written to the connection in the"
  echo "moment before the client read its end, which may have reached the instance and are not sent again."
  echo
  echo "### The client crate's targets"
  echo
  echo "| target | measured | met |"
  echo "|---|---|---|"
  r=$(field "$b1" ours_vs_plain)
  echo "| Ours ≥ 0.95 × a plain channel (one backend) | $r | $(awk -v r="$r" 'BEGIN { print (r >= 0.95) ? "met" : "missed" }') |"
  a=$(field "$p" register_to_first_p99_ms); d=$(field "$p" deregister_to_last_p99_ms)
  echo "| Register → first routed call, Deregister → last, p99 < 50 ms | $(ms "$a") ms, $(ms "$d") ms | $(awk -v a="$a" -v d="$d" 'BEGIN { print (a < 50 && d < 50) ? "met" : "missed" }') |"
  echo
  if $quick; then bench/gateway.sh "$bin" --quick; else bench/gateway.sh "$bin"; fi
  echo
  if $quick; then bench/xds.sh "$bin" --quick; else bench/xds.sh "$bin"; fi
  echo
  if $quick; then bench/dns.sh "$bin" --quick; else bench/dns.sh "$bin"; fi
  echo
  if [ -s "$work/retries" ]; then
    echo "Retried in this run:"
    echo
    cat "$work/retries"
  else
    echo "No workload failed in this run."
  fi
  echo
  # The reading of the numbers is kept by hand beside this script.
  $quick || cat bench/analysis.md
} > "$out"

cat "$out"
$quick && rm -f "$out"
exit 0
