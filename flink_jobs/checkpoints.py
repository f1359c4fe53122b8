"""Where the stream job keeps its checkpoints (under the state directory), without importing PyFlink."""
from __future__ import annotations

import uuid
from pathlib import Path

BACKEND_NOTE = "flead-state-backend"  # in a run's checkpoint folder: the state backend its checkpoints were made by


def checkpoint_dir(cfg) -> Path:
    return cfg.state_dir / "flink" / "checkpoints"


def rocksdb_dir(cfg) -> Path:
    """Where the RocksDB backend keeps a running job's working files: ``stream.rocksdb_dir``, else under the state
    directory (Flink's default is the JVM's temporary directory, often memory-backed)."""
    return Path(cfg.stream.rocksdb_dir).expanduser() if cfg.stream.rocksdb_dir else cfg.state_dir / "flink" / "rocksdb"


def new_job_id() -> str:
    """A Flink job id (32 hex digits), chosen before the job starts: it names the run's checkpoint folder."""
    return uuid.uuid4().hex


def checkpoint_settings(cfg, job_id: str) -> dict[str, str]:
    """Flink's checkpoint options from ``stream.*``: where, how often, on which state backend (RocksDB's working
    files in `rocksdb_dir`), full or incremental; retained on cancellation, so a killed or stopped job resumes from its newest (`latest_checkpoint`). The job id
    is fixed so the run's folder (``<checkpoint_dir>/<job_id>``) can carry its `BACKEND_NOTE` (`note_backend`)."""
    stream = cfg.stream
    settings = {"execution.checkpointing.interval": f"{stream.checkpoint_interval_ms} ms",
                "execution.checkpointing.dir": checkpoint_dir(cfg).as_uri(),
                "execution.checkpointing.externalized-checkpoint-retention": "RETAIN_ON_CANCELLATION",
                "state.backend.type": stream.state_backend,
                "execution.checkpointing.incremental": str(stream.incremental_checkpoints).lower(),
                "$internal.pipeline.job-id": job_id}
    if stream.state_backend == "rocksdb":
        settings["state.backend.rocksdb.localdir"] = str(rocksdb_dir(cfg))
    return settings


def note_backend(cfg, job_id: str) -> None:
    """Write which state backend the run `job_id` checkpoints with into its checkpoint folder."""
    folder = checkpoint_dir(cfg) / job_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / BACKEND_NOTE).write_text(cfg.stream.state_backend + "\n")


def restore_problem(cfg, checkpoint: Path) -> str | None:
    """Why the job cannot resume from `checkpoint` (a run's ``chk-N`` folder, or its ``_metadata``) on its
    ``stream.state_backend``, or None. Flink cannot restore a checkpoint of another state backend, and retries the
    restore without end; a folder without a note (older runs, savepoints) is not judged."""
    checkpoint = Path(checkpoint)
    run = checkpoint.parent.parent if checkpoint.name == "_metadata" else checkpoint.parent
    note = run / BACKEND_NOTE
    written = note.read_text().strip() if note.is_file() else cfg.stream.state_backend
    if written == cfg.stream.state_backend:
        return None
    return (f"{checkpoint} was made by the {written!r} state backend, and stream.state_backend is "
            f"{cfg.stream.state_backend!r}: a job cannot resume from another backend's checkpoint. Resume it with "
            f"FLEAD_STREAM_STATE_BACKEND={written}, or start with --fresh (every device's model starts again)")


def latest_checkpoint(cfg) -> Path | None:
    """The newest retained checkpoint (a ``chk-N`` folder with ``_metadata``) of any run, or None."""
    found = sorted(checkpoint_dir(cfg).glob("*/chk-*/_metadata"), key=lambda p: p.stat().st_mtime)
    return found[-1].parent if found else None
