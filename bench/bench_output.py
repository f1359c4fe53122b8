"""What every benchmark writes: JSON with a `headline` {"name", "value", "unit", "floor"} and every row."""
from __future__ import annotations

import json
from pathlib import Path


def write_json(path: str | Path | None, result: dict) -> None:
    """Write `result` to `path` (folders made as needed); nothing when no path was asked for."""
    if path is None:
        return
    if not {"name", "value", "unit", "floor"} <= set(result.get("headline", {})):
        raise ValueError("a benchmark result needs a headline with name, value, unit and floor")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
