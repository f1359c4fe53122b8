"""visualization/pymongosql_fixes.py inside Superset's virtualenv (where pymongosql is installed)."""
from __future__ import annotations

import subprocess

import pytest

from config import PROJECT_ROOT
from visualization.superset_server import SUPERSET_VENV

pytestmark = pytest.mark.e2e

# Two threads run a query each on the strategy object gunicorn's threads share: each must read back its own plan
# (its result columns), as the cursor does right after `execute`.
PER_THREAD_PLANS = """
import sys, threading
sys.path.insert(0, sys.argv[1])
import pymongosql_fixes
strategy = pymongosql_fixes.SupersetExecutionWithEmptyResults()
strategy._execution_plan = "plan of the main thread"
barrier, seen = threading.Barrier(2), []
def chart():
    strategy._execution_plan = "plan of the other thread"
    barrier.wait()
    seen.append(strategy.execution_plan)
thread = threading.Thread(target=chart)
thread.start()
barrier.wait()
thread.join()
print(strategy.execution_plan, "|", seen[0])
"""


def test_each_thread_reads_back_the_plan_of_its_own_query():
    python = SUPERSET_VENV / "bin" / "python"
    if not python.exists():
        pytest.fail(f"{python} is missing: run `bash visualization/setup_superset.sh` (make test does)")
    out = subprocess.run([str(python), "-c", PER_THREAD_PLANS, str(PROJECT_ROOT / "visualization")],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "plan of the main thread | plan of the other thread"
