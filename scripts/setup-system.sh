#!/usr/bin/env bash
# Debian packages the test suite needs (redis-server for the shared counter store,
# chromium for the usage page's browser tests, openssl to make the upstream TLS test's
# certificate), installed only when missing. Tests never skip for want of them: they fail
# instead.
set -euo pipefail
exec "$(dirname "$0")/need-debian.sh" \
  redis-server=redis-server redis-cli=redis-tools chromium=chromium openssl=openssl
