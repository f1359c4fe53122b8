"""Where the stream job keeps its checkpoints and savepoints (under the state directory), and which one it resumes
from; without importing PyFlink."""
from __future__ import annotations

import uuid
from pathlib import Path

BACKEND_NOTE = "flead-state-backend"  # in a run's checkpoint folder: the state backend its checkpoints were made by


def checkpoint_dir(cfg) -> Path:
    return cfg.state_dir / "flink" / "checkpoints"


def savepoint_dir(cfg) -> Path:
    """Where a stopped job leaves its savepoint (``savepoint-<job>-<id>`` folders, Flink's canonical format, which
    any state backend restores)."""
    return cfg.state_dir / "flink" / "savepoints"


def rocksdb_dir(cfg) -> Path:
    """Where the RocksDB backend keeps a running job's working files: ``stream.rocksdb_dir``, else under the state
    directory (Flink's default is the JVM's temporary directory, often memory-backed)."""
    return Path(cfg.stream.rocksdb_dir).expanduser() if cfg.stream.rocksdb_dir else cfg.state_dir / "flink" / "rocksdb"


def new_job_id() -> str:
    """A Flink job id (32 hex digits), chosen before the job starts: it names the run's checkpoint folder."""
    return uuid.uuid4().hex


def checkpoint_settings(cfg, job_id: str) -> dict[str, str]:
    """Flink's checkpoint options from ``stream.*``: where, how often, on which state backend (RocksDB's working
    files in `rocksdb_dir`), full or incremental; retained on cancellation, so a killed job resumes from its newest
    (`latest_restore_point`); savepoints (a stopped job's) in `savepoint_dir`. The job id is fixed so the run's
    folder (``<checkpoint_dir>/<job_id>``) can carry its `BACKEND_NOTE` (`note_backend`)."""
    stream = cfg.stream
    settings = {"execution.checkpointing.interval": f"{stream.checkpoint_interval_ms} ms",
                "execution.checkpointing.dir": checkpoint_dir(cfg).as_uri(),
                "execution.checkpointing.savepoint-dir": savepoint_dir(cfg).as_uri(),
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
    restore without end; a folder without a note (older runs, savepoints: canonical, any backend) is not judged."""
    checkpoint = Path(checkpoint)
    run = checkpoint.parent.parent if checkpoint.name == "_metadata" else checkpoint.parent
    note = run / BACKEND_NOTE
    written = note.read_text().strip() if note.is_file() else cfg.stream.state_backend
    if written == cfg.stream.state_backend:
        return None
    return (f"{checkpoint} was made by the {written!r} state backend, and stream.state_backend is "
            f"{cfg.stream.state_backend!r}: a job cannot resume from another backend's checkpoint. To move the "
            f"models to {cfg.stream.state_backend!r}: resume on the old one (FLEAD_STREAM_STATE_BACKEND={written} "
            f"flead stream start), stop it with `flead stream stop` (it leaves a savepoint, which any backend "
            f"restores), then start again; or start with --fresh (every device's model starts again)")


def completed_checkpoints(cfg) -> list[Path]:
    """Every retained checkpoint that completed (a run's ``chk-N`` folder with its ``_metadata``), in no order."""
    return [metadata.parent for metadata in checkpoint_dir(cfg).glob("*/chk-*/_metadata")]


def checkpoint_number(checkpoint: Path) -> int:
    """N of a ``chk-N`` folder: a run's checkpoints count up."""
    return int(checkpoint.name.removeprefix("chk-"))


def restore_points(cfg) -> list[Path]:
    """Every retained checkpoint (a run's ``chk-N`` folder) and savepoint with its ``_metadata``, oldest first."""
    found = [*(folder / "_metadata" for folder in completed_checkpoints(cfg)),
             *savepoint_dir(cfg).glob("savepoint-*/_metadata")]
    dated = []
    for metadata in found:
        try:
            dated.append((metadata.stat().st_mtime, metadata.parent))
        except FileNotFoundError:  # a running job retired it meanwhile
            pass
    return [folder for _, folder in sorted(dated)]


def latest_restore_point(cfg) -> Path | None:
    """What the job resumes from: the newest retained checkpoint or savepoint, or None."""
    points = restore_points(cfg)
    return points[-1] if points else None


def retire_savepoints(cfg, keep: int) -> list[Path]:
    """Delete all but the `keep` (at least 1) newest savepoints (a job resumed from one does not own it: Flink
    leaves it); returns what was deleted."""
    import shutil

    savepoints = [p for p in restore_points(cfg) if p.parent == savepoint_dir(cfg)]
    retired = savepoints[:-max(keep, 1)]
    for folder in retired:
        shutil.rmtree(folder, ignore_errors=True)
    return retired
