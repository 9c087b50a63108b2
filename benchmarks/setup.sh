#!/usr/bin/env bash
# Debian packages `make bench` needs, installed only when missing (as root):
#   wrk           the closed-loop HTTP load generator (Debian has no wrk2; the fixed-rate
#                 scenario uses benchmarks/pacer.py instead)
#   redis-server  the Redis storage scenarios (and redis-tools for redis-cli)
set -euo pipefail
exec "$(dirname "$0")/../scripts/need-debian.sh" \
  wrk=wrk redis-server=redis-server redis-cli=redis-tools
