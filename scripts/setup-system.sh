#!/usr/bin/env bash
# Debian packages the test suite needs (redis-server for the shared counter store,
# chromium for the usage page's browser tests, openssl to make the TLS tests' certificates,
# curl as an HTTPS client of the gateway, node and npm for the OpenID Connect provider the
# JWT tests run), installed only when missing; then that provider's npm packages, exactly
# as tests/oidc/package-lock.json pins them, when they are not installed yet. Tests never
# skip for want of them: they fail instead.
set -euo pipefail
here="$(dirname "$0")"
"$here/need-debian.sh" \
  redis-server=redis-server redis-cli=redis-tools chromium=chromium openssl=openssl curl=curl \
  node=nodejs npm=npm
oidc="$here/../tests/oidc"
if [ ! -d "$oidc/node_modules/oidc-provider" ]; then
  (cd "$oidc" && npm ci --no-audit --no-fund --loglevel=error)
fi
