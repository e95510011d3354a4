#!/usr/bin/env bash
# The gateway benchmark, as a section of docs/benchmarks.md on stdout: the same three HTTP
# backends behind `signpost gateway`, behind nginx (a static upstream of the same backends, with
# keep-alive to them), and called directly; wrk for HTTP/1.1 and h2load for HTTP/2 (h2c), 64
# connections; servers pinned to core 0 and the load on the other cores, then nothing pinned.
# Then one backend is killed with SIGKILL under load, behind each proxy.
#
#   bench/gateway.sh BIN_DIR [--quick]
#
# Needs nginx, wrk and h2load (Debian: nginx wrk nghttp2-client); bench/compare.sh calls it.
set -euo pipefail
bin=$1
quick=false
[ "${2:-}" = "--quick" ] && quick=true
if $quick; then seconds=1; rounds=1; else seconds=5; rounds=5; fi
for program in nginx wrk h2load; do
  command -v "$program" >/dev/null 2>&1 || { echo "bench/gateway.sh needs $program" >&2; exit 1; }
done

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

# free_ports N: N free ports, held together while chosen so that no two are the same.
free_ports() {
  python3 -c 'import socket, sys
held = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in held: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in held))' "$1"
}
wait_http() {
  for _ in $(seq 100); do
    curl -sf -o /dev/null "http://$1/" && return
    sleep 0.1
  done
  echo "nothing answers on $1" >&2; exit 1
}
median() { sort -n | awk '{a[NR]=$1} END { if (NR) print a[int((NR+1)/2)]; else print 0 }'; }

cores=$(nproc)
read -r registry b1 b2 b3 < <(free_ports 4)
backend_ports=("$b1" "$b2" "$b3")

# start MODE: every server, pinned to core 0 (MODE pinned) or not; sets GW, GW_PID, NGINX1, NGINX2.
start() {
  local mode=$1 cpu=() workers=auto
  if [ "$mode" = pinned ]; then cpu=(taskset -c 0); workers=1; fi
  RUST_LOG=warn "${cpu[@]}" "$bin/signpost" serve --listen "127.0.0.1:$registry" --store memory \
    >"$work/registry.log" 2>&1 &
  pids+=($!)
  for i in 0 1 2; do
    "${cpu[@]}" "$bin/signpost-bench" http-backend --port "${backend_ports[$i]}" --id "b$i" >/dev/null 2>&1 &
    pids+=($!)
  done
  for i in 0 1 2; do wait_http "127.0.0.1:${backend_ports[$i]}"; done
  for _ in $(seq 100); do
    "$bin/signpost" services --registry "http://127.0.0.1:$registry" >/dev/null 2>&1 && break
    sleep 0.1
  done
  for i in 0 1 2; do
    "$bin/signpost" register web --registry "http://127.0.0.1:$registry" --id "b$i" \
      --address 127.0.0.1 --port "${backend_ports[$i]}" >/dev/null
  done
  GW=127.0.0.1:$(free_ports 1)
  RUST_LOG=warn "${cpu[@]}" "$bin/signpost" gateway --listen "$GW" \
    --registry "http://127.0.0.1:$registry" --access-log false >"$work/gateway.log" 2>&1 &
  GW_PID=$!; pids+=("$GW_PID")
  read -r n1 n2 < <(free_ports 2)
  NGINX1=127.0.0.1:$n1; NGINX2=127.0.0.1:$n2
  {
    echo "worker_processes $workers;"
    echo "pid $work/nginx.pid;"
    echo "error_log $work/nginx-error.log warn;"
    echo "events { worker_connections 4096; }"
    echo "http {"
    echo "  access_log off;"
    echo "  keepalive_requests 1000000;"
    echo "  client_body_temp_path $work/nginx-body;"
    echo "  proxy_temp_path $work/nginx-proxy;"
    echo "  upstream web {"
    for p in "${backend_ports[@]}"; do echo "    server 127.0.0.1:$p max_fails=1 fail_timeout=10s;"; done
    echo "    keepalive 64;"
    echo "  }"
    for listen in "$NGINX1" "$NGINX2 http2"; do
      echo "  server {"
      echo "    listen $listen;"
      echo "    location /web/ { proxy_pass http://web/; proxy_http_version 1.1; proxy_set_header Connection \"\"; }"
      echo "  }"
    done
    echo "}"
  } >"$work/nginx.conf"
  "${cpu[@]}" nginx -c "$work/nginx.conf"
  wait_http "$GW/web"
  wait_http "$NGINX1/web"
}

stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  { wait "${pids[@]}"; } 2>/dev/null || true
  pids=()
  if [ -f "$work/nginx.pid" ]; then
    kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
    for _ in $(seq 50); do [ -f "$work/nginx.pid" ] || break; sleep 0.1; done
  fi
}

# wrk1 URL: "req/s p50_ms p99_ms"
wrk1() {
  "${load[@]}" wrk -t1 -c64 -d"${seconds}s" --latency "$1" | awk '
    / 50%/ { p50 = $2 } / 99%/ { p99 = $2 } /Requests\/sec/ { rps = $2 }
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    END { printf "%.0f %.3f %.3f\n", rps, ms(p50), ms(p99) }'
}

# one URL: the p50 in ms of one connection's requests, one at a time: what a hop adds.
one() {
  "${load[@]}" wrk -t1 -c1 -d"${seconds}s" --latency "$1" | awk '
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    / 50%/ { print ms($2) }'
}

# h2 URL: "req/s p50_ms p99_ms" from h2load's per-request log.
h2() {
  local log=$work/h2.log
  rm -f "$log"
  "${load[@]}" h2load -c64 -m1 -t1 -D "$seconds" --log-file="$log" "$1" >"$work/h2.out" 2>&1
  local rps
  rps=$(sed -n 's/.*finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p' "$work/h2.out")
  awk '{print $3}' "$log" | sort -n | awk -v rps="$rps" '{a[NR]=$1} END {
    printf "%.0f %.3f %.3f\n", rps, a[int(NR*0.5)]/1000, a[int(NR*0.99)]/1000 }'
}

# measure TOOL URL: the medians over the rounds, "req/s p50 p99".
declare -A results
measure_all() {
  local mode=$1 tool name url i
  for i in $(seq "$rounds"); do
    one "http://127.0.0.1:${backend_ports[0]}/" >>"$work/$mode-one-direct"
    one "http://$GW/web/" >>"$work/$mode-one-gateway"
    one "http://$NGINX1/web/" >>"$work/$mode-one-nginx"
  done
  for name in direct gateway nginx; do
    results[$mode-one-$name]=$(median <"$work/$mode-one-$name")
  done
  for tool in wrk1 h2; do
    for i in $(seq "$rounds"); do
      # The order turns every round, so that no target always runs first.
      for name in direct gateway nginx; do
        case $name in
          direct) url="http://127.0.0.1:${backend_ports[0]}/" ;;
          gateway) url="http://$GW/web/" ;;
          nginx) url="http://$NGINX1/web/"; [ "$tool" = h2 ] && url="http://$NGINX2/web/" ;;
        esac
        $tool "$url" >>"$work/$mode-$tool-$name"
      done
    done
    for name in direct gateway nginx; do
      results[$mode-$tool-$name]="$(awk '{print $1}' "$work/$mode-$tool-$name" | median) $(awk '{print $2}' "$work/$mode-$tool-$name" | median) $(awk '{print $3}' "$work/$mode-$tool-$name" | median)"
    done
  done
}

# killed URL: wrk through URL while backend 1 is killed; sets KILLED to "requests failed".
# Not run in a subshell: the backend it starts again must be this shell's, for the next run.
killed() {
  local out=$work/kill.out
  "${load[@]}" wrk -t1 -c64 -d"$((seconds + 2))s" "$1" >"$out" &
  local w=$!
  sleep 1
  { kill -9 "${pids[2]}" && wait "${pids[2]}"; } 2>/dev/null || true
  wait "$w"
  local total non2xx sock
  total=$(awk '/requests in/ {print $1}' "$out")
  non2xx=$(awk '/Non-2xx/ {print $5}' "$out")
  sock=$(awk -F'[ ,]+' '/Socket errors/ {print $4 + $6 + $8 + $10}' "$out")
  KILLED="$total $(( ${non2xx:-0} + ${sock:-0} ))"
  # Back on the same port for the next run.
  "${server_cpu[@]}" "$bin/signpost-bench" http-backend --port "${backend_ports[1]}" --id b1 >/dev/null 2>&1 &
  pids[2]=$!
  wait_http "127.0.0.1:${backend_ports[1]}"
  sleep 1
}

for mode in pinned unpinned; do
  if [ "$mode" = pinned ] && [ "$cores" -ge 2 ]; then
    server_cpu=(taskset -c 0); load=(taskset -c "1-$((cores - 1))")
  else
    server_cpu=(); load=()
  fi
  [ "$mode" = pinned ] && [ "$cores" -lt 2 ] && continue
  start "$mode"
  measure_all "$mode"
  if [ "$mode" = pinned ]; then
    killed "http://$GW/web/"; kill_gateway=$KILLED
    killed "http://$NGINX1/web/"; kill_nginx=$KILLED
  fi
  stop_all
done

f() { awk -v i="$2" '{print $i}' <<<"${results[$1]}"; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "-" }'; }
us() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.0f", (a - b) * 1000 }'; }

echo "## The gateway"
echo
echo "\`bench/gateway.sh\`: three \`signpost-bench http-backend\` processes (hyper, a 3-byte answer)"
echo "registered in a memory registry, behind \`signpost gateway --access-log false\`, behind nginx"
echo "$(nginx -v 2>&1 | sed 's/.*nginx\//nginx /') (a static \`upstream\` of the same three, \`keepalive 64\`, access log off), and"
echo "called directly (one backend: a reference, not a like-for-like figure). 64 connections, median of"
echo "$rounds rounds of ${seconds} s, the order turned each round. Pinned: the registry, the backends, the"
echo "gateway and nginx (one worker) on core 0, the load generator on the rest; unpinned: nothing pinned"
echo "(nginx \`worker_processes auto\`)."
echo
echo "| | protocol | target | req/s | p50 | p99 | gateway / nginx req/s | p99 gateway / nginx | p50 added over direct |"
echo "|---|---|---|---:|---:|---:|---:|---:|---:|"
for mode in pinned unpinned; do
  [ -n "${results[$mode-wrk1-gateway]:-}" ] || continue
  for tool in wrk1 h2; do
    proto="HTTP/1.1 (wrk)"; [ "$tool" = h2 ] && proto="HTTP/2 h2c (h2load)"
    for name in direct gateway nginx; do
      k=$mode-$tool-$name
      case $name in
        direct) extra="| | | |" ;;
        gateway) extra="| $(ratio "$(f "$k" 1)" "$(f "$mode-$tool-nginx" 1)") | $(ratio "$(f "$k" 3)" "$(f "$mode-$tool-nginx" 3)") | $(us "$(f "$k" 2)" "$(f "$mode-$tool-direct" 2)") µs |" ;;
        nginx) extra="| | | $(us "$(f "$k" 2)" "$(f "$mode-$tool-direct" 2)") µs |" ;;
      esac
      echo "| $mode | $proto | $name | $(f "$k" 1) | $(f "$k" 2) ms | $(f "$k" 3) ms $extra"
    done
  done
done
echo
echo "What a hop adds: the p50 of one connection's requests, one at a time (wrk -c1), over direct."
echo
echo "| | direct p50 | gateway p50 | nginx p50 | gateway adds | nginx adds |"
echo "|---|---:|---:|---:|---:|---:|"
for mode in pinned unpinned; do
  [ -n "${results[$mode-one-gateway]:-}" ] || continue
  d=${results[$mode-one-direct]}; g=${results[$mode-one-gateway]}; n=${results[$mode-one-nginx]}
  echo "| $mode | $(awk -v a="$d" 'BEGIN{printf "%.0f", a*1000}') µs | $(awk -v a="$g" 'BEGIN{printf "%.0f", a*1000}') µs | $(awk -v a="$n" 'BEGIN{printf "%.0f", a*1000}') µs | $(us "$g" "$d") µs | $(us "$n" "$d") µs |"
done
echo
echo "At 64 connections the p50 columns are mostly queueing on the shared cores; the one-connection"
echo "figures are the latency a hop adds."
echo
if [ -n "${kill_gateway:-}" ]; then
  read -r gt gf <<<"$kill_gateway"
  read -r nt nf <<<"$kill_nginx"
  echo "One backend killed with SIGKILL one second into $((seconds + 2)) s of wrk (64 connections, pinned); its"
  echo "registration stays, so the gateway must route around an instance the registry still lists."
  echo "nginx: \`max_fails=1 fail_timeout=10s\`, \`proxy_next_upstream\` at its default (error, timeout)."
  echo
  echo "| target | requests | failed (non-2xx or socket errors) |"
  echo "|---|---:|---:|"
  echo "| gateway | $gt | $gf |"
  echo "| nginx | $nt | $nf |"
  echo
fi
