#!/usr/bin/env bash
# Make sure a Redis answers at $REDIS_HOST:$REDIS_PORT (default 127.0.0.1:6379); start a local one if not.
# It never hangs: every wait is bounded, and it says what to do when it cannot start one. A Redis it starts keeps
# its data in $RECSERVE_REDIS_DIR (default var/redis in the project).
set -euo pipefail
host=${REDIS_HOST:-127.0.0.1}
port=${REDIS_PORT:-6379}

ping() { timeout 2 redis-cli -h "$host" -p "$port" ping 2>/dev/null | grep -q PONG; }

if command -v redis-cli >/dev/null && ping; then
  echo "redis: answering at $host:$port"
  exit 0
fi
if ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "redis: not installed; installing Debian's redis-server"
    timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 300 apt-get install -y -qq redis-server >/dev/null
  else
    echo "redis: nothing answers at $host:$port and redis-server is not installed." >&2
    echo "       install it (sudo apt-get install redis-server) or point REDIS_HOST/REDIS_PORT at one." >&2
    exit 1
  fi
fi
# Append-only persistence in a folder of the project's own, so a restart keeps accepted events (and the event
# log's unflushed stream). appendfsync everysec: a Redis crash or restart loses nothing (the kernel's page cache
# holds what was written, and SHUTDOWN fsyncs); an OS crash or power loss can lose up to ~1 s of acknowledged
# writes. No RDB snapshots (--save ''): the AOF is the one copy. A Redis someone else started keeps its settings.
dir=${RECSERVE_REDIS_DIR:-"$(cd "$(dirname "$0")/.." && pwd)/var/redis"}
mkdir -p "$dir"
echo "redis: starting a local redis-server on port $port (append-only, fsync every second, in $dir)"
redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --appendonly yes --appendfsync everysec --save '' \
  --daemonize yes >/dev/null
for _ in $(seq 50); do ping && { echo "redis: up at $host:$port"; exit 0; }; sleep 0.1; done
echo "redis: started redis-server but it does not answer at $host:$port" >&2
exit 1
