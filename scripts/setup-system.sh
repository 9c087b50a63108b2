#!/usr/bin/env bash
# Debian packages the test suite needs (redis-server for the shared counter store,
# chromium for the usage page's browser tests, openssl to make the TLS tests' certificates,
# curl as an HTTPS client of the gateway), installed only when missing. Tests never skip for want of them: they fail
# instead.
set -euo pipefail
exec "$(dirname "$0")/need-debian.sh" \
  redis-server=redis-server redis-cli=redis-tools chromium=chromium openssl=openssl curl=curl
