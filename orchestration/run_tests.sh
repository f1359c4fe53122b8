#!/usr/bin/env bash
# The test command of the README (`make test` runs set-up, then this). Tests that need servers start them
# themselves (tests/conftest.py) on free ports and stop them. Extra arguments go to pytest, e.g.
#   bash orchestration/run_tests.sh -m "not e2e"      # skip the browser test
#   bash orchestration/run_tests.sh tests/unit        # only the fast core tests
set -uo pipefail
cd "$(dirname "$0")/.."
export SPARK_LOCAL_IP=127.0.0.1
export PYTHONUNBUFFERED=1
mkdir -p artifacts
.venv/bin/python -m pytest -p no:cacheprovider --timeout 1200 --junitxml=artifacts/junit.xml "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "run_tests: pytest collected no tests; that is a failure here (the suite always has tests)" >&2
  exit 1
fi
exit "$rc"
