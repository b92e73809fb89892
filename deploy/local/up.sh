#!/usr/bin/env bash
# A multi-node fedmla deployment on this one machine, on loopback:
#   - a Ray cluster of three nodes (a head and two workers, `ray start`),
#   - the coordinator with TLS and per-client tokens, Prometheus metrics, and the
#     read-only dashboard over its store,
#   - a job that runs the federated clients as Ray actors spread over the Ray nodes,
#     talking to the coordinator over gRPC with TLS and their tokens.
#
#   deploy/local/up.sh [--dir DIR] [--clients N] [--rounds R] [--preset NAME] [--no-job]
#   deploy/local/down.sh [--dir DIR]
#
# Every process is started in a session of its own and its id recorded in DIR/pids;
# down.sh stops exactly those sessions. DIR (default runs/local-cluster) also holds
# the certificates, tokens, the coordinator's store, logs and `ports.env`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
dir=runs/local-cluster clients=4 rounds=2 preset=tiny job=1

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir=$2; shift 2 ;;
    --clients) clients=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --preset) preset=$2; shift 2 ;;
    --no-job) job=0; shift ;;
    -h|--help) usage 0 ;;
    *) echo "up.sh: unknown argument '$1'" >&2; usage ;;
  esac
done
for v in clients rounds; do
  case "${!v}" in ''|*[!0-9]*|0) echo "up.sh: --$v must be a positive integer, got '${!v}'" >&2; exit 2 ;; esac
done
command -v ray >/dev/null || { echo "up.sh: 'ray' not found; run bash deploy/install.sh" >&2; exit 1; }
command -v fedmla >/dev/null || { echo "up.sh: 'fedmla' not found; run bash deploy/install.sh" >&2; exit 1; }

mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
pids=$dir/pids
if [ -s "$pids" ]; then
  while read -r pid name; do
    if kill -0 "$pid" 2>/dev/null; then
      echo "up.sh: $name (pid $pid) from an earlier up.sh is still running; run deploy/local/down.sh --dir $dir" >&2
      exit 1
    fi
  done < "$pids"
fi
: > "$pids"
mkdir -p "$dir/logs" "$dir/tokens"
export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1

fail() { echo "up.sh: $*" >&2; echo "up.sh: logs are in $dir/logs; stopping what was started" >&2; "$here/down.sh" --dir "$dir" >&2 || true; exit 1; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'; }
# start NAME CMD...: run CMD in a new session (its pid is the session and group id), log to logs/NAME.log
start() {
  local name=$1; shift
  setsid "$@" >"$dir/logs/$name.log" 2>&1 < /dev/null &
  echo "$! $name" >> "$pids"
}
wait_for() {  # wait_for SECONDS DESCRIPTION CMD...
  local limit=$1 what=$2; shift 2
  local t=0
  until "$@" >/dev/null 2>&1; do
    t=$((t + 1)); [ $t -le "$limit" ] || fail "timed out after ${limit}s waiting for $what"
    sleep 1
  done
}

# ---- certificates and tokens ---------------------------------------------------------
[ -f "$dir/certs/server.crt" ] || bash "$root/deploy/tls/make-certs.sh" "$dir/certs" --host localhost --ip 127.0.0.1 >/dev/null
store=$dir/store
for i in $(seq 0 $((clients - 1))); do
  name=client-$i
  [ -s "$dir/tokens/$name" ] || fedmla token create --client "$name" --store "$store" > "$dir/tokens/$name"
done

# ---- Ray: a head and two worker nodes --------------------------------------------------
ray_tmp=$(mktemp -d /tmp/fedmla-ray.XXXXXX)   # short: Ray's socket paths must fit in 107 bytes
echo "$ray_tmp" > "$dir/ray_tmp"
gcs_port=$(free_port) ray_dash=$(free_port)
start ray-head ray start --head --block --node-ip-address 127.0.0.1 --port "$gcs_port" \
  --num-cpus 1 --object-store-memory 150000000 --include-dashboard true \
  --dashboard-host 127.0.0.1 --dashboard-port "$ray_dash" --temp-dir "$ray_tmp" --disable-usage-stats
wait_for 90 "the Ray head" ray status --address "127.0.0.1:$gcs_port"
nodes_alive() {  # nodes_alive N: at least N live nodes in the cluster
  python3 - "$gcs_port" "$1" <<'PY'
import sys, ray
ray.init(address=f"127.0.0.1:{sys.argv[1]}", logging_level="ERROR", log_to_driver=False)
alive = sum(1 for n in ray.nodes() if n["Alive"])
ray.shutdown()
sys.exit(0 if alive >= int(sys.argv[2]) else 1)
PY
}
# One node at a time: two raylets registering at once can time out on a busy 2-core host.
for i in 1 2; do
  start "ray-node-$i" ray start --block --address "127.0.0.1:$gcs_port" --node-ip-address 127.0.0.1 \
    --num-cpus 1 --object-store-memory 150000000
  wait_for 120 "Ray node $i to join" nodes_alive $((i + 1))
done

# ---- coordinator with TLS and tokens ---------------------------------------------------
dash_port=$(free_port) metrics_port=$(free_port)
rm -f "$dir/coordinator.port"
start coordinator fedmla coordinator --store "$store" --preset "$preset" --host 127.0.0.1 --port 0 \
  --port-file "$dir/coordinator.port" \
  --tls-cert "$dir/certs/server.crt" --tls-key "$dir/certs/server.key" \
  --rounds "$rounds" --clients-per-round "$clients" --min-replies "$clients" \
  --metrics-port "$metrics_port"
wait_for 60 "the coordinator's port file" test -s "$dir/coordinator.port"
coord_port=$(cat "$dir/coordinator.port")
wait_for 30 "the coordinator's health service" python3 -m fedmla.coordinator.healthcheck \
  --address "localhost:$coord_port" --ca "$dir/certs/ca.crt"

# The dashboard: read-only over the coordinator's store, on loopback.
start dashboard fedmla dashboard --store "$store" --host 127.0.0.1 --port "$dash_port"
wait_for 30 "the dashboard" python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$dash_port/api/health', timeout=2)"

cat > "$dir/ports.env" <<ENV
RAY_ADDRESS=127.0.0.1:$gcs_port
RAY_DASHBOARD=http://127.0.0.1:$ray_dash
FEDMLA_COORDINATOR=localhost:$coord_port
FEDMLA_DASHBOARD=http://127.0.0.1:$dash_port
FEDMLA_METRICS=http://127.0.0.1:$metrics_port/metrics
ENV

# ---- the job: the clients as Ray actors on the cluster --------------------------------------
if [ "$job" = 1 ]; then
  start job fedmla simulate --address "127.0.0.1:$gcs_port" --coordinator "localhost:$coord_port" \
    --token-dir "$dir/tokens" --ca "$dir/certs/ca.crt" --clients "$clients" \
    --json "$dir/job.json"
fi

echo "fedmla local cluster is up ($dir)"
echo "  coordinator   localhost:$coord_port (TLS + tokens), store $store"
echo "  dashboard     http://127.0.0.1:$dash_port"
echo "  metrics       http://127.0.0.1:$metrics_port/metrics"
echo "  Ray           127.0.0.1:$gcs_port, dashboard http://127.0.0.1:$ray_dash"
[ "$job" = 1 ] && echo "  job           $clients clients x $rounds rounds; log $dir/logs/job.log, result $dir/job.json"
echo "stop with: deploy/local/down.sh --dir $dir"
