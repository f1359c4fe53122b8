"""`BucketWriter`: stores readings and score records as bucket documents exactly once, and their roll-ups.

Used by the sink (one writer for its lifetime) and by `Store.write_scores` / `Store.write_readings`.

- Exactly once, whatever the batching: before writing, each device's readings are checked against a `SeqIndex`
  of the seq numbers already stored (loaded from the database by `load`), duplicates within a batch are dropped,
  and only the rest is written, as one document per device per call (``_id`` = ``<device_id>:<first seq>``).
  A replay after a restart, regrouped into other micro-batches, therefore adds nothing; a late reading that fills
  a gap is stored. (One writer per database: two sinks would each trust their own index.)
- Roll-ups (storage.rollups) are summed in memory over one *generation* and inserted when it closes
  (`close_generation`); every bucket document names its generation, and the database remembers the last
  generation whose roll-ups were written (`sink_state` "rollups"). `load` writes the roll-ups of any later
  generation found in the buckets: a sink that died between its writes repairs the roll-ups when it starts again.
  Each generation also updates the fleet summary (storage.summaries), which `load` recomputes.
- A write that failed half-way (MongoDB unreachable) can be repeated with the same input: documents already
  inserted are kept, the index and the roll-ups advance only after the whole write succeeded, and a generation
  is not closed while a write is unfinished.
"""
from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from storage.buckets import (MAX_BUCKET_BYTES, READING_COLUMNS, SCORE_COLUMNS, ScoreBlock, SeqIndex, bucket_spans,
                             chunks, concat_blocks, first_of_each_seq, max_bucket_rows, reading_bucket, score_bucket,
                             select_rows, unpack_columns)
from storage import summaries
from storage.mongo import batch_size_for
from storage.rollups import FLEET, RollupAccumulator, levels, merged_document
from storage.schemas import SCHEMAS
from telemetry.schema import Columns

log = logging.getLogger(__name__)

ROLLUP_STATE = "rollups"
COMPACTION_STATE = "compaction"
ALERT_FIELDS = tuple(SCHEMAS["alerts"]["properties"])
BUCKETED = ("predictions", "device_data")


@dataclass
class Written:
    """What one `BucketWriter.write` stored: new readings per collection, new alerts, readings already stored."""

    predictions: int = 0
    alerts: int = 0
    device_data: int = 0
    replayed: int = 0


def readings_by_device(blocks: Sequence) -> dict[str, list]:
    """`telemetry.schema.Columns` blocks grouped by device, in arrival order."""
    out: dict[str, list] = defaultdict(list)
    for block in blocks:
        out[block.device_id].append(block)
    return out


def stack_readings(blocks: Sequence) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One device's blocks as (metric names, seq, ts, labels, values): names in order of first appearance,
    values NaN where a block lacks a metric."""
    names = list(dict.fromkeys(name for b in blocks for name in b.names))
    if all(list(b.names) == names for b in blocks):
        values = np.vstack([b.X for b in blocks])
    else:
        values = np.full((sum(len(b.seqs) for b in blocks), len(names)), math.nan)
        row = 0
        for b in blocks:
            values[row:row + len(b.seqs), [names.index(n) for n in b.names]] = b.X
            row += len(b.seqs)
    seq = np.concatenate([np.asarray(b.seqs, dtype=np.int64) for b in blocks])
    ts = np.concatenate([np.asarray(b.ts, dtype=np.int64) for b in blocks])
    labels = np.concatenate([np.array(b.labels, dtype=np.float64) for b in blocks])  # None -> nan (-1 stays)
    labels = np.where(np.isnan(labels), -1, labels).astype(np.int8)
    return names, seq, ts, labels, values


def stack_by_device(blocks: Sequence) -> list:
    """`telemetry.schema.Columns` blocks merged into one per device (`stack_readings`: ``seqs``, ``ts`` and
    ``labels`` become arrays, labels -1 where missing), so the decoding processes hand the writer one block per
    device instead of one per message."""
    out = []
    for device, device_blocks in readings_by_device(blocks).items():
        names, seq, ts, labels, values = stack_readings(device_blocks)
        out.append(Columns(device, tuple(names), values, seq, ts, labels))
    return out


class BucketWriter:
    """Writes bucket documents through a `Store`; see the module docstring."""

    def __init__(self, store):
        self.store, self.cfg = store, store.cfg
        self.indexes = {key: SeqIndex(self.cfg.sink.max_seq_gaps) for key in BUCKETED}
        self.levels = levels(self.cfg)
        self.accumulator = RollupAccumulator(self.levels)
        self.generation = 1
        self.generation_started = time.monotonic()
        self.dirty = False  # a write started and has not succeeded yet
        self.last_stored_at = 0

    # --- start-up ---------------------------------------------------------------------------------------------

    def load(self) -> dict:
        """Read which readings are stored (the seq index) and write the roll-ups of generations stored but not
        rolled up (a sink that died between its writes); returns what it found."""
        for index in self.indexes.values():
            index.clear()
        self.accumulator = RollupAccumulator(self.levels)
        self._finish_compaction()
        emitted = self.store.sink_state(ROLLUP_STATE).get("emitted_through", 0)
        pending: dict[int, RollupAccumulator] = {}
        newest = emitted
        for key in BUCKETED:
            heads = self.store.find(key, None, ("device_id", "seq_first", "seq_last", "n", "generation"))
            full_ids = []
            for head in heads:
                newest = max(newest, head["generation"])
                if head["generation"] > emitted or head["seq_last"] - head["seq_first"] + 1 != head["n"]:
                    full_ids.append(head["_id"])
                else:
                    self.indexes[key].add_spans(head["device_id"], [(head["seq_first"], head["seq_last"])])
            for doc in self.store.find(key, {"_id": {"$in": full_ids}}) if full_ids else []:
                self.indexes[key].add_spans(doc["device_id"], bucket_spans(doc))
                if doc["generation"] > emitted:
                    self._accumulate(pending.setdefault(doc["generation"], RollupAccumulator(self.levels)), key, doc)
        for generation in sorted(pending):
            log.warning("roll-ups of generation %d were not written (the sink stopped between its writes): "
                        "writing them now", generation)
            self._emit(pending[generation], generation)
        self.generation = newest + 1
        self.generation_started = time.monotonic()
        summaries.rebuild(self.store)  # derived data: a crash between a write and its summary loses nothing
        return {"emitted_through": emitted, "repaired_generations": sorted(pending),
                "devices": {key: len(index.intervals) for key, index in self.indexes.items()}}

    @staticmethod
    def _accumulate(acc: RollupAccumulator, key: str, doc: dict) -> None:
        if key == "predictions":
            acc.add_scores(doc["device_id"], unpack_columns(doc, SCORE_COLUMNS))
        else:
            cols = unpack_columns(doc, READING_COLUMNS)
            acc.add_readings(doc["device_id"], cols["ts"], doc["metric_names"], cols["values"])

    # --- writes -----------------------------------------------------------------------------------------------

    def _stored_at(self) -> int:
        self.last_stored_at = max(self.last_stored_at, int(time.time() * 1000))  # never backwards
        return self.last_stored_at

    def write(self, scores: Sequence[ScoreBlock] = (), readings: Sequence = ()) -> Written:
        """Store valid score records (`storage.buckets.ScoreBlock`s, as `score_block` makes them) and reading
        blocks (`telemetry.schema.Columns`, timestamps within ``±MAX_ABS_TS``), each reading once."""
        self.dirty = True
        stored_at = self._stored_at()
        written = Written()
        predictions, alerts, new_scores = self._plan_scores(scores, stored_at, written)
        device_data, new_readings = self._plan_readings(readings, stored_at, written)
        # Alerts before their buckets: once a bucket is stored its readings count as stored, so a crash in
        # between must leave the alerts written (a repeat finds them), never the bucket without its alerts.
        written.alerts = len(self.store.insert_new("alerts", alerts))
        self.store.insert_new("predictions", predictions)
        self.store.insert_new("device_data", device_data)
        for device, cols in new_scores:
            self.indexes["predictions"].add(device, cols["seq"])
            self.accumulator.add_scores(device, cols)
        for device, seq, ts, names, values in new_readings:
            self.indexes["device_data"].add(device, seq)
            self.accumulator.add_readings(device, ts, names, values)
        self.dirty = False
        return written

    def _plan_scores(self, blocks: Sequence[ScoreBlock], stored_at: int, written: Written):
        by_device: dict[str, list[ScoreBlock]] = defaultdict(list)
        for block in blocks:
            by_device[block.device_id].append(block)
        docs, alerts, new = [], [], []
        rows_per_bucket = max_bucket_rows(len(SCORE_COLUMNS))
        for device, device_blocks in by_device.items():
            block = concat_blocks(device_blocks)
            cols = block.cols
            keep = first_of_each_seq(cols["seq"])
            keep = keep[self.indexes["predictions"].unstored(device, cols["seq"][keep])]
            written.replayed += len(cols["seq"]) - len(keep)
            if not len(keep):
                continue
            kept = select_rows(cols, keep)
            new.append((device, kept))
            written.predictions += len(keep)
            docs += [score_bucket(device, select_rows(kept, rows), self.generation, stored_at)
                     for rows in chunks(len(keep), rows_per_bucket)]
            for row in keep[kept["is_anomaly"].astype(bool)].tolist():
                record = block.alerts[row]
                alerts.append({k: record[k] for k in ALERT_FIELDS if k in record}
                              | {"_id": f"{device}:{record['seq']}", "stored_at": stored_at})
        return docs, alerts, new

    def _plan_readings(self, blocks: Sequence, stored_at: int, written: Written):
        docs, new = [], []
        for device, device_blocks in readings_by_device(blocks).items():
            names, seq, ts, labels, values = stack_readings(device_blocks)
            keep = first_of_each_seq(seq)
            keep = keep[self.indexes["device_data"].unstored(device, seq[keep])]
            written.replayed += len(seq) - len(keep)
            if not len(keep):
                continue
            seq, ts, labels, values = seq[keep], ts[keep], labels[keep], values[keep]
            new.append((device, seq, ts, names, values))
            written.device_data += len(keep)
            docs += [reading_bucket(device, seq[rows], ts[rows], labels[rows], names, values[rows], self.generation,
                                    stored_at) for rows in chunks(len(keep), max_bucket_rows(len(names) + 2))]
        return docs, new

    # --- roll-ups ---------------------------------------------------------------------------------------------

    def close_generation(self, force: bool = False) -> bool:
        """Write the roll-ups of the current generation and start the next, when it is `rollups.generation_s`
        old (or `force`); never while a write is unfinished. Returns whether it wrote."""
        if self.dirty:
            return False
        if not force and time.monotonic() - self.generation_started < self.cfg.rollups.generation_s:
            return False
        if self.accumulator:
            self._emit(self.accumulator, self.generation)
            self.generation += 1
            self.accumulator = RollupAccumulator(self.levels)
        self.generation_started = time.monotonic()
        return True

    def _emit(self, acc: RollupAccumulator, generation: int) -> None:
        for key, docs in acc.documents(generation, self._stored_at()).items():
            self.store.insert_new(key, docs)
        totals = summaries.update_devices(self.store, acc.stats, generation)  # before the generation counts as
        summaries.update_fleet(self.store, acc.stats, generation, totals)     # written
        state = self.store.sink_state(ROLLUP_STATE)
        self.store.set_sink_state(ROLLUP_STATE, {"emitted_through": max(generation,
                                                                        state.get("emitted_through", 0))})

    # --- compaction ---------------------------------------------------------------------------------------

    def compact_rollups(self, max_sources: int = 20_000) -> dict[str, int]:
        """Merge the partials of each group and bucket into one document (`storage.rollups`: a live stream
        leaves one partial per generation), so the dashboards read fewer documents; returns partials removed per
        collection. Crash-safe: the partials about to go are noted in `sink_state` "compaction" first, the merged
        documents (``_id`` ``<group>:<bucket>:<newest generation>c``) are inserted, then the partials deleted;
        `load` finishes a compaction that a crash interrupted. Only generations whose roll-ups are written are
        touched, and at most `max_sources` partials per call."""
        self._finish_compaction()
        emitted = self.store.sink_state(ROLLUP_STATE).get("emitted_through", 0)
        removed = {}
        for level in self.levels:
            groups: dict[tuple, list[dict]] = defaultdict(list)
            for doc in self.store.find(level.key):
                if doc["generation"] <= emitted:
                    groups[(doc.get("device_id", FLEET), doc["ts"])].append(doc)
            sources = [docs for docs in groups.values() if len(docs) > 1]
            batch, count = [], 0
            for docs in sources:
                if count + len(docs) > max_sources:
                    break
                batch.append(docs)
                count += len(docs)
            if batch:
                self.store.set_sink_state(COMPACTION_STATE, {"key": level.key,
                                                             "sources": [d["_id"] for docs in batch for d in docs]})
                self._finish_compaction()
                removed[level.key] = count
        return removed

    def _finish_compaction(self) -> None:
        """Complete the compaction noted in `sink_state` (if any): merged documents in, sources out."""
        state = self.store.sink_state(COMPACTION_STATE)
        if not state.get("sources"):
            return
        level = next(level for level in self.levels if level.key == state["key"])
        present = self.store.find(level.key, {"_id": {"$in": state["sources"]}})
        if len(present) == len(state["sources"]):  # none deleted yet: (re)make the merged documents
            groups: dict[tuple, list[dict]] = defaultdict(list)
            for doc in present:
                groups[(doc.get("device_id", FLEET), doc["ts"])].append(doc)
            self.store.insert_new(level.key, [merged_document(level, docs) for docs in groups.values()])
        if present:
            self.store.collection(level.key).delete_many({"_id": {"$in": state["sources"]}})
        self.store.set_sink_state(COMPACTION_STATE, {"key": level.key, "sources": []})

    def rebuild_rollups(self) -> tuple[int, int]:
        """Delete every roll-up and recompute it from the buckets, as one generation; returns (readings read,
        roll-up documents written). For a stopped sink (it would write roll-ups meanwhile)."""
        acc = RollupAccumulator(self.levels)
        readings, newest = 0, self.store.sink_state(ROLLUP_STATE).get("emitted_through", 0)
        per_reply = batch_size_for(2 * MAX_BUCKET_BYTES)  # a bucket: its packed values, metric names, incident ids
        for key in BUCKETED:
            for doc in self.store.collection(key).find(batch_size=per_reply):
                self._accumulate(acc, key, doc)
                newest = max(newest, doc["generation"])
                readings += doc["n"] if key == "predictions" else 0
        if acc.skipped:
            log.warning("%d readings have timestamps outside ±2^62 ms: left out of the roll-ups", acc.skipped)
        for level in self.levels:
            self.store.collection(level.key).delete_many({})
        docs = acc.documents(newest, self._stored_at())
        for key, level_docs in docs.items():
            self.store.insert_new(key, level_docs)
        self.store.set_sink_state(ROLLUP_STATE, {"emitted_through": newest})
        summaries.rebuild(self.store)
        return readings, sum(len(d) for d in docs.values())


__all__ = ["BucketWriter", "Written", "readings_by_device", "stack_by_device", "stack_readings"]
