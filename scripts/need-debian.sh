#!/usr/bin/env bash
# Install the Debian packages whose commands are missing, and nothing else.
# Arguments: COMMAND=PACKAGE pairs, e.g. redis-cli=redis-tools. Needs root when one is missing.
set -euo pipefail
need=()
for pair in "$@"; do
  command -v "${pair%%=*}" >/dev/null 2>&1 || need+=("${pair#*=}")
done
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "missing Debian packages: ${need[*]} (run as root, or: sudo apt-get install ${need[*]})" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
