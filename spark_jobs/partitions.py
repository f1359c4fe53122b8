"""Where a round's snapshots and codec vectors live between its Spark passes (`models.partitioned.Partitions`).

The driver reads the round's window once (from MongoDB, `aggregate_job.read_window`, or the snapshots topic split
by owner, `spark_jobs.topic_window.read_split_snapshots`), or each partition reads it from the topic (keeping its
own devices); a first pass checks and encodes each partition's
snapshots (`spark_jobs.snapshots.check_block`) and returns the blocks' heads (choices, counts, norms); the
aggregation's passes (`models.partitioned`) then read the blocks' vectors again, two to four times. Two homes:

- `LocalBlocks`, when every executor runs on this machine (a ``local[...]`` master): a private directory (in
  /dev/shm when it has room, `scratch_directory`). The driver writes each partition's snapshots there (a pickle:
  it holds whatever JSON a topic message carried, which BSON may not), the first pass writes each block's vectors
  as ``.npy``, later passes map them (``np.load(mmap_mode="r")``); every pass leaves its replies there as pickles
  for the driver. Nothing big crosses the JVM: shipping a 10,000-device round's vectors (372 MB) to the Python
  workers again took ~1 s per pass here, caching them filled the default 1 GB driver heap, and a few wide devices'
  vectors took ~5 s through Spark's collect.
- `RddBlocks`, for any other master: the snapshots parallelized from the driver, the blocks a persisted RDD
  (memory, then disk), shipped to the Python workers by each pass.
"""
from __future__ import annotations

import json
import logging
import pickle
import shutil
import tempfile
import threading
import uuid
from functools import partial
from pathlib import Path

import numpy as np

from config import Config
from models.partitioned import VectorBlock
from spark_jobs.snapshots import BlockHead, ConfiguredLayout, block_head, check_block, snapshot_limits
from spark_jobs.topic_window import TopicWindow, read_own_snapshots

SHARED_MEMORY = Path("/dev/shm")
log = logging.getLogger(__name__)


def fetched(cfg: Config, docs: list) -> list[dict]:
    """A partition's snapshots: ``docs`` as they are, or fetched by ``_id`` when the driver read ids only."""
    if not docs or not isinstance(docs[0], str):
        return docs
    from storage.mongo import Store  # here: a worker that is handed the snapshots never imports pymongo's client

    with Store(cfg) as db:
        return db.local_models_by_id(docs)


def partition_count(cfg: Config, source, cores: int | None = None) -> int:
    """Partitions of a round: `aggregation.spark_partitions`, at most one per core (``cores``: Spark's
    ``defaultParallelism``; more only queue behind each other, add a task to every pass and, reading the topic,
    read it once more each) and one per group of devices (when they are known: ``source`` is their groups, not a
    `TopicWindow`), at least one. 10,000 devices on 2 cores: 4 partitions 8.8-9.3 s, 2 partitions 7.5-8.0 s
    (bench/aggregate.py)."""
    limit = min(cfg.aggregation.spark_partitions, cores or cfg.aggregation.spark_partitions)
    return max(1, limit if isinstance(source, TopicWindow) else min(len(source), limit))


def read_part(cfg: Config, source, index: int, parts: int, docs: list) -> tuple[list[dict], int]:
    """Executor side: partition ``index``'s snapshots, and how many messages were unreadable: from the topic when
    ``source`` is a `TopicWindow` (`spark_jobs.topic_window`), else ``docs`` (fetched by ``_id`` if they are ids)."""
    if isinstance(source, TopicWindow):
        return read_own_snapshots(cfg, source, index, parts)
    return fetched(cfg, docs), 0


def split_groups(groups: list[list], parts: int) -> list[list]:
    """Devices' groups in ``parts`` contiguous runs of nearly equal size (as `SparkContext.parallelize` cuts)."""
    bounds = [len(groups) * i // parts for i in range(parts + 1)]
    return [groups[a:b] for a, b in zip(bounds, bounds[1:])]


def _started(_index: int) -> int:
    """Executor side: nothing; unpickling this function imports this module (and the round's code) there."""
    return _index


def warm_workers(sc) -> None:
    """Start Spark's Python workers and import the round's code in them (a job of one tiny task per core); the
    round's passes then reuse them (``spark.python.worker.reuse``)."""
    parts = sc.defaultParallelism
    sc.parallelize(range(parts), parts).map(_started).collect()


def start_warming_workers(sc) -> threading.Thread:
    """`warm_workers` on a thread of its own, started: the driver goes on meanwhile (reads a round's window, writes
    its partitions' snapshots) and its first job reuses the workers. A failure there is left to that job to report
    (it meets the same cause)."""
    def warm() -> None:
        try:
            warm_workers(sc)
        except Exception as exc:  # noqa: BLE001 - the round's own first job raises it
            log.debug("warming Spark's Python workers failed: %s", exc)

    thread = threading.Thread(target=warm, name="warm-workers", daemon=True)
    thread.start()
    return thread


# ---------------------------------------------------------------- this machine: a private directory

def _check_stored(cfg_values: dict, key: bytes, reference_shapes, keep_weights: bool, directory: str, source,
                  parts: int, index: int) -> BlockHead:
    """Executor side: partition ``index``'s snapshots (from the directory, or the topic: `read_part`), checked and
    encoded; its vectors back to the directory, its head to the driver."""
    cfg = Config(cfg_values)
    folder = Path(directory)
    stored = b"" if source is not None else (folder / f"snapshots-{index}.pickle").read_bytes()
    docs = [] if source is not None else (pickle.loads(stored) if stored
                                          else json.loads((folder / f"ids-{index}.json").read_text()))
    docs, unreadable = read_part(cfg, source, index, parts, docs)
    block = check_block(index, docs, key, reference_shapes, ConfiguredLayout(cfg), snapshot_limits(cfg),
                        keep_weights)
    block.unreadable = unreadable
    if block.vectors is not None:
        np.save(folder / f"vectors-{index}.npy", block.vectors.vectors, allow_pickle=False)
        (folder / f"rows-{index}.json").write_text(json.dumps({"device_ids": block.vectors.device_ids,
                                                               "n_samples": block.vectors.n_samples.tolist()}))
    return block_head(cfg.aggregation.max_norm_ratio, block)


def _on_stored_block(fn, directory: str, index: int):
    """Executor side: ``fn`` on partition ``index``'s block, its vectors memory-mapped from the directory."""
    folder = Path(directory)
    rows = json.loads((folder / f"rows-{index}.json").read_text())
    vectors = np.load(folder / f"vectors-{index}.npy", mmap_mode="r", allow_pickle=False)
    return fn(VectorBlock(index, rows["device_ids"], np.asarray(rows["n_samples"], dtype=np.int64), vectors))


def _reply_to_file(task, directory: str, index: int) -> str:
    """Executor side: ``task(index)``'s reply pickled into the directory (a name of its own); returns its path."""
    path = Path(directory) / f"reply-{index}-{uuid.uuid4().hex}.pickle"
    path.write_bytes(pickle.dumps(task(index), pickle.HIGHEST_PROTOCOL))
    return str(path)


def scratch_directory(cfg: Config, snapshot_bytes: int) -> Path:
    """A new private directory: in /dev/shm when it has room for `aggregation.shm_headroom` × the window's
    snapshot bytes (a container's /dev/shm is often 64 MB), else in the system's temporary directory (also the
    choice when the executors fetch the snapshots themselves: their size is not known here)."""
    room = (snapshot_bytes > 0 and SHARED_MEMORY.is_dir()
            and shutil.disk_usage(SHARED_MEMORY).free >= cfg.aggregation.shm_headroom * snapshot_bytes)
    return Path(tempfile.mkdtemp(prefix="flead-round-", dir=SHARED_MEMORY if room else None))


class LocalBlocks:
    """A round's blocks in a private directory of this machine (module docstring), removed by `close`."""

    def __init__(self, sc):
        self.sc = sc
        self.parts = 0
        self.directory: Path | None = None

    def check(self, cfg: Config, key: bytes, source, reference_shapes,
              keep_weights: bool = False) -> list[BlockHead]:
        """The first pass: write each partition's snapshots (unless the partitions read them from the topic:
        ``source`` a `TopicWindow`, else the devices' groups), check and encode them on the executors."""
        self.parts = partition_count(cfg, source, self.sc.defaultParallelism)
        if isinstance(source, TopicWindow):
            if self.directory is None:
                self.directory = scratch_directory(cfg, source.n_messages * cfg.aggregation.snapshot_size_bytes)
            return self._run(partial(_check_stored, cfg.to_dict(), key, reference_shapes, keep_weights,
                                     str(self.directory), source, self.parts))
        payloads = []
        for part in split_groups(source, self.parts):
            items = [d for group in part for d in group]
            whole = not items or not isinstance(items[0], str)
            payloads.append((pickle.dumps(items, pickle.HIGHEST_PROTOCOL) if whole else b"",
                             "[]" if whole else json.dumps(items)))
        if self.directory is None:
            self.directory = scratch_directory(cfg, sum(len(snapshots) for snapshots, _ in payloads))
        for index, (snapshots, ids) in enumerate(payloads):
            (self.directory / f"snapshots-{index}.pickle").write_bytes(snapshots)
            (self.directory / f"ids-{index}.json").write_text(ids)
        return self._run(partial(_check_stored, cfg.to_dict(), key, reference_shapes, keep_weights,
                                 str(self.directory), None, self.parts))

    def map(self, fn) -> list:
        return self._run(partial(_on_stored_block, fn, str(self.directory)))

    def _run(self, task) -> list:
        """``task(index)`` for every partition, on the executors; each reply comes back as a pickle in the directory,
        not through the JVM (a few wide devices' vectors, 200 MB, took ~5 s through Spark's collect)."""
        replies = []
        paths = self.sc.parallelize(range(self.parts), self.parts).map(
            partial(_reply_to_file, task, str(self.directory))).collect()
        for path in map(Path, paths):
            replies.append(pickle.loads(path.read_bytes()))
            path.unlink()
        return replies

    def close(self) -> None:
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


# ---------------------------------------------------------------- any cluster: a persisted RDD

def _check_partition(cfg_values: dict, key: bytes, reference_shapes, keep_weights: bool, source, parts: int,
                     index: int, device_groups):
    """Executor side: this partition's devices' snapshots (fetched if the driver sent ids, read from the topic when
    ``source`` is a `TopicWindow`), checked and encoded."""
    cfg = Config(cfg_values)
    docs, unreadable = read_part(cfg, source, index, parts, [d for group in device_groups for d in group])
    block = check_block(index, docs, key, reference_shapes, ConfiguredLayout(cfg), snapshot_limits(cfg), keep_weights)
    block.unreadable = unreadable
    yield block


def _on_block(fn, block):
    """Executor side: ``fn`` on a persisted `CheckedBlock`'s vectors."""
    return fn(block.vectors)


class RddBlocks:
    """A round's blocks as a persisted RDD of `CheckedBlock`s, one per partition, unpersisted by `close`."""

    def __init__(self, sc):
        self.sc = sc
        self.rdd = None

    def check(self, cfg: Config, key: bytes, source, reference_shapes,
              keep_weights: bool = False) -> list[BlockHead]:
        """The first pass (``source``: the devices' groups, or a `TopicWindow` each partition reads itself)."""
        from pyspark import StorageLevel

        self.close()
        parts = partition_count(cfg, source, self.sc.defaultParallelism)
        topic = source if isinstance(source, TopicWindow) else None
        self.rdd = (self.sc.parallelize([] if topic else source, parts)
                    .mapPartitionsWithIndex(partial(_check_partition, cfg.to_dict(), key, reference_shapes,
                                                    keep_weights, topic, parts))
                    .persist(StorageLevel.MEMORY_AND_DISK))
        return self.rdd.map(partial(block_head, cfg.aggregation.max_norm_ratio)).collect()

    def map(self, fn) -> list:
        return self.rdd.map(partial(_on_block, fn)).collect()

    def close(self) -> None:
        if self.rdd is not None:
            self.rdd.unpersist()
            self.rdd = None


def _rows_to_file(directory: str, index: int, rows):
    """Executor side: a partition's rows pickled into the directory; yields the file's path."""
    path = Path(directory) / f"rows-{index}.pickle"
    path.write_bytes(pickle.dumps(list(rows), pickle.HIGHEST_PROTOCOL))
    yield str(path)


def collect_rows(cfg: Config, sc, rdd) -> list:
    """The rows of ``rdd``, as ``rdd.collect()`` gives them: on a local master through files in a private scratch
    directory, so large rows never cross the JVM (a round's 10,000 vectors collected through Spark, 372 MB,
    exhausted its default 1 GB driver); on any other master through Spark."""
    if not sc.master.startswith("local"):
        return rdd.collect()
    directory = scratch_directory(cfg, 0)
    try:
        paths = rdd.mapPartitionsWithIndex(partial(_rows_to_file, str(directory))).collect()
        return [row for path in paths for row in pickle.loads(Path(path).read_bytes())]
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def round_blocks(sc):
    """Where this round's blocks live: `LocalBlocks` on a local master, else `RddBlocks`."""
    return LocalBlocks(sc) if sc.master.startswith("local") else RddBlocks(sc)
