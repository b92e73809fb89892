#!/usr/bin/env bash
# Stop exactly what deploy/local/up.sh started: each recorded process and the session
# it leads (its children), by process id; then remove Ray's temporary directory.
#
#   deploy/local/down.sh [--dir DIR] [--grace SECONDS]
set -uo pipefail
dir=runs/local-cluster grace=20
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir=$2; shift 2 ;;
    --grace) grace=$2; shift 2 ;;
    -h|--help) sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "down.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
pids=$dir/pids
[ -f "$pids" ] || { echo "down.sh: nothing to stop ($pids not found)"; exit 0; }

members() { ps -eo pid=,sid= | awk -v s="$1" '$2 == s {print $1}'; }

# Stop in reverse start order: the job, the coordinator, then the Ray nodes.
mapfile -t lines < <(tac "$pids")
for line in "${lines[@]}"; do
  read -r pid name <<< "$line"
  [ -n "${pid:-}" ] || continue
  if [ -n "$(members "$pid")" ]; then
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 "$grace"); do
      [ -z "$(members "$pid")" ] && break
      sleep 1
    done
    if [ -n "$(members "$pid")" ]; then
      echo "down.sh: $name (session $pid) did not stop in ${grace}s; killing it" >&2
      for p in $(members "$pid"); do kill -KILL "$p" 2>/dev/null || true; done
    fi
    echo "stopped $name (session $pid)"
  fi
done
left=""
for line in "${lines[@]}"; do
  read -r pid name <<< "$line"
  [ -n "${pid:-}" ] && [ -n "$(members "$pid")" ] && left="$left $name"
done
if [ -n "$left" ]; then echo "down.sh: still running:$left" >&2; exit 1; fi
if [ -f "$dir/ray_tmp" ]; then
  t=$(cat "$dir/ray_tmp")
  case "$t" in /tmp/fedmla-ray.*) rm -rf "$t" ;; esac
  rm -f "$dir/ray_tmp"
fi
: > "$pids"
echo "fedmla local cluster is down"
