"""The chaos suite prints its table (lost, duplicated, dead-lettered, rejected per fault) at the end of the run
and keeps it in artifacts/chaos-table.md (docs/reliability.md quotes a run)."""
from __future__ import annotations

from config import PROJECT_ROOT
from harness import RESULTS, table, timelines


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    text = table(RESULTS)
    terminalreporter.write_sep("=", "chaos: what each fault cost")
    terminalreporter.write_line(text)
    terminalreporter.write_line("timeline of each phase (seconds since it began):\n" + timelines(RESULTS))
    out = PROJECT_ROOT / "artifacts"
    out.mkdir(exist_ok=True)
    (out / "chaos-table.md").write_text(text + "\n")
