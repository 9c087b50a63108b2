#!/usr/bin/env bash
# Are the lower bounds pyproject.toml publishes true? Resolve every direct dependency to the
# oldest version it allows (uv's --resolution lowest-direct; what they pull in resolves
# normally), install that into .venv-lowest, and run a fast subset of the suite that touches
# every dependency: HTTP parsing, CEL, Rego, JSON, YAML, pydantic models, Redis, tiktoken,
# the simulator and the openai SDK. Needs .venv (for uv) and redis-server, like `make test`.
# Not part of `make test`: it downloads a second set of packages (docs/dependencies.md).
set -euo pipefail
cd "$(dirname "$0")/.."
UV=.venv/bin/uv
VENV=.venv-lowest
REQ=$VENV.txt
"$UV" pip compile pyproject.toml requirements/build.in --all-extras --resolution lowest-direct \
  --python-version 3.11 --python-platform x86_64-manylinux_2_28 --quiet -o "$REQ"
rm -rf "$VENV"
"$UV" venv --quiet --python "${PYTHON:-python3}" "$VENV"
VIRTUAL_ENV=$VENV "$UV" pip install --quiet -r "$REQ"
VIRTUAL_ENV=$VENV "$UV" pip install --quiet --no-deps --no-build-isolation -e .
echo "lowest direct versions:"
grep -E '^[a-z0-9_.-]+==' "$REQ" | sed 's/ .*//' | paste -sd' ' | fold -s -w 100
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_bad_input.py tests/test_cel.py tests/test_auth.py tests/test_resources.py \
  tests/test_usage.py tests/test_limits.py tests/test_storage.py tests/test_storage_redis.py \
  tests/test_http_server.py tests/test_upstream_client.py tests/test_gateway.py \
  tests/test_openai_sdk.py tests/test_tutorial.py tests/test_simulator.py \
  tests/test_http_edge.py tests/test_upstream_hostile.py "$@"
