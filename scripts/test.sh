#!/bin/sh
# Sets up everything (see setup.sh) and runs the whole test suite: type check,
# then every test, the real-kernel and namespace ones included; a skipped test
# fails the run. Needs root.
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup.sh
echo "== mypy"
.venv/bin/mypy
echo "== pytest"
status=0
FLOODD_TEST_NO_SKIPS=1 .venv/bin/pytest -q "$@" || status=$?
if [ "$status" -eq 5 ]; then
    echo "test: no tests ran" >&2
    exit 1
fi
exit "$status"
