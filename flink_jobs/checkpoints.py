"""Where the stream job keeps its checkpoints (under the state directory), without importing PyFlink."""
from __future__ import annotations

from pathlib import Path


def checkpoint_dir(cfg) -> Path:
    return cfg.state_dir / "flink" / "checkpoints"


def latest_checkpoint(cfg) -> Path | None:
    """The newest retained checkpoint (a ``chk-N`` folder with ``_metadata``) of any run, or None."""
    found = sorted(checkpoint_dir(cfg).glob("*/chk-*/_metadata"), key=lambda p: p.stat().st_mtime)
    return found[-1].parent if found else None
