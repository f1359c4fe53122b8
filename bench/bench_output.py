"""What every benchmark writes: JSON with a `headline` {"name", "value", "unit", "floor"} and every row; and how
it stops."""
from __future__ import annotations

import json
import signal
from pathlib import Path


def stop_cleanly_on_sigterm() -> None:
    """Make SIGTERM (`kill`, `timeout`) end the benchmark as Ctrl-C does: through its ``finally`` blocks, which stop
    the broker, database and jobs it started (by default Python dies at once and leaves them running)."""
    signal.signal(signal.SIGTERM, _exit)


def _exit(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def write_json(path: str | Path | None, result: dict) -> None:
    """Write `result` to `path` (folders made as needed); nothing when no path was asked for."""
    if path is None:
        return
    if not {"name", "value", "unit", "floor"} <= set(result.get("headline", {})):
        raise ValueError("a benchmark result needs a headline with name, value, unit and floor")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
