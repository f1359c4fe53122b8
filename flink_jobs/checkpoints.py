"""Where the stream job keeps its checkpoints (under the state directory), without importing PyFlink."""
from __future__ import annotations

from pathlib import Path


def checkpoint_dir(cfg) -> Path:
    return cfg.state_dir / "flink" / "checkpoints"


def checkpoint_settings(cfg) -> dict[str, str]:
    """Flink's checkpoint options from ``stream.*``: where, how often, on which state backend, full or incremental;
    retained on cancellation, so a killed or stopped job resumes from its newest (`latest_checkpoint`)."""
    stream = cfg.stream
    return {"execution.checkpointing.interval": f"{stream.checkpoint_interval_ms} ms",
            "execution.checkpointing.dir": checkpoint_dir(cfg).as_uri(),
            "execution.checkpointing.externalized-checkpoint-retention": "RETAIN_ON_CANCELLATION",
            "state.backend.type": stream.state_backend,
            "execution.checkpointing.incremental": str(stream.incremental_checkpoints).lower()}


def latest_checkpoint(cfg) -> Path | None:
    """The newest retained checkpoint (a ``chk-N`` folder with ``_metadata``) of any run, or None."""
    found = sorted(checkpoint_dir(cfg).glob("*/chk-*/_metadata"), key=lambda p: p.stat().st_mtime)
    return found[-1].parent if found else None
