#!/usr/bin/env bash
# The DNS benchmark, as a section of docs/benchmarks.md on stdout: dnsperf against Signpost's DNS
# (answering from its live view of a 100-instance service) and against NSD serving the same
# records from a static zone file, in the same run, rounds interleaved. A and SRV lookups, over
# UDP and TCP; queries per second at saturation (median of the rounds) and latency percentiles at
# a fixed rate. The servers run pinned to core 0 with dnsperf on the other cores, then unpinned.
#
#   bench/dns.sh BIN_DIR [--quick]
#
# Needs dnsperf and nsd (Debian packages dnsperf, nsd); bench/compare.sh calls it.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$1
quick=false
[ "${2:-}" = "--quick" ] && quick=true
if $quick; then seconds=1; rounds=1; rate_seconds=1; else seconds=5; rounds=5; rate_seconds=5; fi
instances=100
rate=5000
for tool in dnsperf nsd; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || {
    echo "bench/dns.sh needs $tool (apt-get install dnsperf nsd)" >&2; exit 1; }
done
nsd=$(command -v nsd || echo /usr/sbin/nsd)

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
cores=$(nproc)

# The same records for both: the instance addresses, SRV records with their targets' glue.
{
  echo '$ORIGIN signpost.'
  echo '$TTL 5'
  echo '@ IN SOA ns.signpost. hostmaster.signpost. 1 3600 600 86400 5'
  echo '@ IN NS ns.signpost.'
  echo 'ns IN A 127.0.0.1'
  for i in $(seq 0 $((instances - 1))); do
    a=$((i / 100)); b=$((i % 100 + 1))
    hex=$(printf '0a01%02x%02x' "$a" "$b")
    echo "big.service IN A 10.1.$a.$b"
    echo "_big._tcp.service IN SRV 1 100 $((9000 + i)) $hex.addr"
    echo "$hex.addr IN A 10.1.$a.$b"
  done
} > "$work/signpost.zone"
echo 'big.service.signpost A' > "$work/A.txt"
echo '_big._tcp.service.signpost SRV' > "$work/SRV.txt"

# start_nsd MODE: sets NSD_PORT.
start_nsd() {
  local cpu=() count=$cores
  [ "$1" = pinned ] && cpu=(taskset -c 0) && count=1
  NSD_PORT=$(free_port)
  cat > "$work/nsd.conf" <<EOF
server:
  ip-address: 127.0.0.1@$NSD_PORT
  server-count: $count
  reuseport: yes
  username: ""
  chroot: ""
  zonesdir: "$work"
  database: ""
  zonelistfile: "$work/zone.list"
  pidfile: "$work/nsd.pid"
  xfrdfile: "$work/xfrd.state"
  xfrdir: "$work"
  logfile: "$work/nsd.log"
  hide-version: yes
  # Rate limiting would drop most of a benchmark's queries from one address.
  rrl-ratelimit: 0
remote-control:
  control-enable: no
zone:
  name: signpost
  zonefile: "$work/signpost.zone"
EOF
  "${cpu[@]}" "$nsd" -d -c "$work/nsd.conf" >/dev/null 2>&1 &
  NSD_PID=$!; pids+=("$NSD_PID")
}

# start_signpost MODE: a memory registry with DNS, filled with the instances; sets SP_PORT.
start_signpost() {
  local cpu=()
  [ "$1" = pinned ] && cpu=(taskset -c 0)
  : > "$work/signpost.log"
  RUST_LOG=warn,signpost=info "${cpu[@]}" "$bin/signpost" serve --listen 127.0.0.1:0 --store memory \
    --dns-listen 127.0.0.1:0 --dns-udp-max-records "$instances" >/dev/null 2>"$work/signpost.log" &
  SP_PID=$!; pids+=("$SP_PID")
  local addr=""
  for _ in $(seq 100); do
    addr=$(sed -n 's/.*listening on \([0-9.:]*\).*/\1/p' "$work/signpost.log" | sed -n 1p)
    SP_PORT=$(sed -n 's/.*dns on 127.0.0.1:\([0-9]*\).*/\1/p' "$work/signpost.log" | sed -n 1p)
    [ -n "$addr" ] && [ -n "$SP_PORT" ] && break
    sleep 0.1
  done
  [ -n "$SP_PORT" ] || { echo "signpost did not start:" >&2; cat "$work/signpost.log" >&2; exit 1; }
  for i in $(seq 0 $((instances - 1))); do
    "$bin/signpost" register big --registry "http://$addr" --address "10.1.$((i / 100)).$((i % 100 + 1))" \
      --port $((9000 + i)) >/dev/null
  done
}

wait_answering() {
  for _ in $(seq 100); do
    local out
    out=$(dnsperf -s 127.0.0.1 -p "$1" -d "$work/A.txt" -n 1 -t 1 2>&1 || true)
    [[ $out =~ Queries\ completed:\ +1\  ]] && return
    sleep 0.1
  done
  echo "no DNS answer on port $1" >&2; exit 1
}

perf_cpu=()
# perf PORT TYPE TRANSPORT [ARGS...]: dnsperf's statistics.
perf() {
  local port=$1 type=$2 mode=$3; shift 3
  "${perf_cpu[@]}" dnsperf -s 127.0.0.1 -p "$port" -m "$mode" -d "$work/$type.txt" -c 10 -q 100 -e "$@" 2>&1
}
qps() { sed -n 's/.*Queries per second: *\([0-9.]*\).*/\1/p' <<<"$1"; }
size() { sed -n 's/.*response \([0-9]*\).*/\1/p' <<<"$1"; }
median() { sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print 0; else print v[int((NR + 1) / 2)] }'; }
# pct P < latencies in seconds: the P-th percentile, in ms.
pct() { sort -n | awk -v p="$1" '{ v[NR] = $1 } END { if (NR == 0) { print "-"; exit } i = int(NR * p / 100 + 0.999); if (i < 1) i = 1; printf "%.3f", v[i] * 1000 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
k() { awk -v a="$1" 'BEGIN { printf "%.1fk", a / 1000 }'; }

modes=(unpinned)
[ "$cores" -ge 2 ] && command -v taskset >/dev/null 2>&1 && modes=(pinned unpinned)

echo "## DNS"
echo
echo "dnsperf (10 clients, 100 queries in flight) asking for the $instances healthy instances of one service:"
echo "A (\`big.service.signpost\`) and SRV (\`_big._tcp.service.signpost\`, with glue), against Signpost"
echo "answering from its live view and NSD $("$nsd" -v 2>&1 | sed -n 's/.*version \([0-9.]*\).*/\1/p' | sed -n 1p) serving the same records from a static zone file."
echo "Queries per second: median of $rounds interleaved ${seconds}-second runs at saturation. Latency: ${rate_seconds} s at"
echo "$rate queries/s. Pinned: each server on core 0 (NSD with one server process), dnsperf on the"
echo "others; unpinned: NSD with one process per core, nothing pinned."
echo
echo "| servers | query | transport | NSD q/s | Signpost q/s | Signpost / NSD (target ≥ 0.5) | NSD p50 / p99 | Signpost p50 / p99 | answer bytes NSD / Signpost |"
echo "|---|---|---|---:|---:|---:|---:|---:|---:|"
for mode in "${modes[@]}"; do
  perf_cpu=()
  [ "$mode" = pinned ] && perf_cpu=(taskset -c "1-$((cores - 1))")
  start_nsd "$mode"
  start_signpost "$mode"
  wait_answering "$NSD_PORT"
  wait_answering "$SP_PORT"
  for type in A SRV; do
    for transport in udp tcp; do
      : > "$work/nsd.qps"; : > "$work/sp.qps"
      for _ in $(seq "$rounds"); do
        out=$(perf "$NSD_PORT" "$type" "$transport" -l "$seconds"); qps "$out" >> "$work/nsd.qps"; nsd_size=$(size "$out")
        out=$(perf "$SP_PORT" "$type" "$transport" -l "$seconds"); qps "$out" >> "$work/sp.qps"; sp_size=$(size "$out")
      done
      n=$(median < "$work/nsd.qps"); s=$(median < "$work/sp.qps")
      perf "$NSD_PORT" "$type" "$transport" -l "$rate_seconds" -Q "$rate" -v | sed -n 's/^> [A-Z]* .* \([0-9.]*\)$/\1/p' > "$work/nsd.lat"
      perf "$SP_PORT" "$type" "$transport" -l "$rate_seconds" -Q "$rate" -v | sed -n 's/^> [A-Z]* .* \([0-9.]*\)$/\1/p' > "$work/sp.lat"
      echo "| $mode | $type | $transport | $(k "$n") | $(k "$s") | $(ratio "$s" "$n") | $(pct 50 < "$work/nsd.lat") / $(pct 99 < "$work/nsd.lat") ms | $(pct 50 < "$work/sp.lat") / $(pct 99 < "$work/sp.lat") ms | $nsd_size / $sp_size |"
    done
  done
  kill "$NSD_PID" "$SP_PID" 2>/dev/null || true
  wait "$NSD_PID" "$SP_PID" 2>/dev/null || true
done
echo
echo "Over UDP the two do not send the same answer: NSD keeps an RRset whole, and an RRset that"
echo "does not fit 1,232 bytes goes out as an empty truncated answer (the client asks again over"
echo "TCP); Signpost sends as many records as fit, marked truncated. Over TCP both send every record."
