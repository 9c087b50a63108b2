#!/usr/bin/env bash
# Debian packages `make bench` needs, installed only when missing (as root):
#   wrk           the closed-loop HTTP load generator (Debian has no wrk2; the fixed-rate
#                 scenario uses benchmarks/pacer.py instead)
#   redis-server  the Redis storage scenarios (and redis-tools for redis-cli)
set -euo pipefail
need=()
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "missing Debian packages: ${need[*]} (run as root, or: sudo apt-get install ${need[*]})" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
