"""What a weight snapshot must pass to enter a round: one set of checks for the Spark job and the REST API.

A stored snapshot (`local_models`) is checked on its own, in this order: signature (`models.integrity`), blob
(base64, magic, SHA-256), structure (layers and shapes of the current global model, or of the configured
architecture at the snapshot's input width when there is none; floating dtype; finite values; ``n_samples`` ≥ 1
and ≤ ``n_seen``). Then, per device, `models.aggregation.newest_plausible` picks one snapshot for the round: the
newest whose counters follow the device's previous one. None of these checks looks at another device.
"""
from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field, replace

import numpy as np

from models.aggregation import SnapshotLimits, cosine_similarity, newest_plausible, structure_problem
from models.integrity import verify_record, wire_form
from models.partitioned import BlockSummary, VectorBlock, block_summary
from models.serialization import SerializationError, from_b64, loads
from models.updates import Update, codec_for, federated_vectors, flatten
from telemetry.schema import SNAPSHOT_SCHEMA

COUNTER_FIELDS = ("version", "n_samples", "n_seen", "created_at")


@dataclass
class Candidate:
    """One stored snapshot after its own checks: ``update`` when usable, else ``problem`` says why not."""

    device_id: str
    version: object
    update: Update | None = None
    loss: float | None = None
    architecture: str | None = None
    problem: str | None = None


@dataclass
class DeviceChoice:
    """A device's update for the round (None if none of its snapshots qualifies) and why others were skipped."""

    device_id: str
    update: Update | None
    loss: float | None = None
    architecture: str | None = None
    rejected: list[tuple[str, str]] = field(default_factory=list)


def snapshot_limits(cfg) -> SnapshotLimits:
    return SnapshotLimits(max_readings_per_s=cfg.aggregation.max_readings_per_s)


@functools.lru_cache(maxsize=64)
def _detector_shapes(settings_json: str, n_metrics: int) -> tuple[tuple[int, ...], ...]:
    from models.detector import DetectorSettings, DeviceDetector

    settings = DetectorSettings.from_dict(json.loads(settings_json))
    detector = DeviceDetector([f"m{i}" for i in range(n_metrics)], settings)
    return tuple(tuple(w.shape) for w in detector.get_weights())


class ConfiguredLayout:
    """The layer shapes of the configured model (`model.*`) at a given input width (built once per process)."""

    def __init__(self, cfg):
        from models.detector import DetectorSettings

        self.settings_json = json.dumps(DetectorSettings.from_config(cfg).to_dict(), sort_keys=True)
        # width = per_metric × metrics + fixed: inputs not from metrics (the time of day) have a width of their own
        one, two = (_detector_shapes(self.settings_json, n)[-1][0] for n in (1, 2))
        self.per_metric, self.fixed_width = two - one, 2 * one - two
        self.max_vector_entries = cfg.aggregation.max_vector_entries

    def width_problem(self, shapes: list[tuple[int, ...]], architecture: str | None) -> str | None:
        """Why a model of these shapes is too wide to aggregate (`aggregation.max_vector_entries`), or None."""
        length = codec_for(architecture).vector_length(shapes)
        if length <= self.max_vector_entries:
            return None
        return (f"too wide to federate: a model of {shapes[-1][0]:,} inputs aggregates as a vector of {length:,} "
                f"entries, more than aggregation.max_vector_entries ({self.max_vector_entries:,}); the device "
                "keeps scoring with its own model")

    def shapes(self, weights: list[np.ndarray]) -> list[tuple[int, ...]] | None:
        """The configured model's shapes at ``weights``' input width (its last layer's length), or None when no
        number of metrics gives that width."""
        if not weights or np.ndim(weights[-1]) != 1:
            return None
        metrics, rest = divmod(int(np.shape(weights[-1])[0]) - self.fixed_width, self.per_metric)
        if metrics < 1 or rest:
            return None
        return list(_detector_shapes(self.settings_json, metrics))


def counters_problem(doc: dict) -> str | None:
    """Why a snapshot's counters cannot be used (missing, not integers, out of range), or None."""
    for name in COUNTER_FIELDS:
        value = doc.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < (1 if name == "n_samples" else 0):
            return f"{name}: expected an integer ≥ {1 if name == 'n_samples' else 0}, got {value!r:.40}"
    return None


def check_snapshot(doc: dict, key: bytes, reference_shapes: list[tuple[int, ...]] | None,
                   layout: ConfiguredLayout) -> Candidate:
    """One stored snapshot checked on its own (see the module docstring); ``reference_shapes`` are the global
    model's (None before the first), ``layout`` the configured model's."""
    device_id = str(doc.get("device_id"))
    candidate = Candidate(device_id, doc.get("version"))
    candidate.problem = (verify_record(wire_form(doc, SNAPSHOT_SCHEMA), key) or counters_problem(doc))
    if candidate.problem:
        return candidate
    try:
        weights, meta = loads(from_b64(doc["weights"]))
    except (SerializationError, KeyError, TypeError) as exc:
        candidate.problem = f"weights: {exc}"
        return candidate
    shapes = reference_shapes or layout.shapes(weights)
    if shapes is None:
        candidate.problem = "weights: no layout of the configured model (model.*) has these layers"
        return candidate
    update = Update(device_id, weights, *(int(doc[name]) for name in ("n_samples", "version", "n_seen", "created_at")))
    candidate.problem = structure_problem(update, shapes) or layout.width_problem(shapes, meta.get("architecture"))
    if candidate.problem is None:
        loss = doc.get("loss")
        candidate.update = update
        candidate.loss = float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else None
        candidate.architecture = meta.get("architecture")
    return candidate


def choose_per_device(candidates: list[Candidate], limits: SnapshotLimits) -> list[DeviceChoice]:
    """One `DeviceChoice` per device among ``candidates`` (a device's snapshots in the round's window, in the order
    they were written). Of several usable copies of one version the first counts (as MongoDB's ``_id`` keeps it);
    copies that failed their checks are rejected and hide nothing: a forged first copy cannot displace the genuine
    one."""
    by_device: dict[str, list[Candidate]] = {}
    for c in candidates:
        by_device.setdefault(c.device_id, []).append(c)
    choices = []
    for device_id, own in by_device.items():
        rejected = [(device_id, f"v{c.version}: {c.problem}") for c in own if c.problem]
        first_per_version = {}
        for c in own:
            if c.update is not None:
                first_per_version.setdefault(c.update.version, c)
        usable = {id(c.update): c for c in first_per_version.values()}
        chosen, implausible = newest_plausible([c.update for c in usable.values()], limits)
        choice = DeviceChoice(device_id, chosen, rejected=rejected + implausible)
        if chosen is not None:
            choice.loss, choice.architecture = usable[id(chosen)].loss, usable[id(chosen)].architecture
        choices.append(choice)
    return choices


@dataclass
class CheckedBlock:
    """One Spark partition's snapshots after their checks (`check_block`): every device's choice (counters and
    reasons; its update without weights) and the chosen updates' codec vectors, which stay in the partition.

    ``vectors`` is None when the chosen updates do not share one codec kind and one layout (the round then
    collects the weights, `check_block` with ``keep_weights``); ``like`` is one chosen update's wire weights
    (their shapes and dtypes decode the round's mean)."""

    choices: list[DeviceChoice]
    vectors: VectorBlock | None
    kind: str | None = None
    like: list[np.ndarray] | None = None
    unreadable: int = 0  # messages of the partition's input that were no snapshot at all (`spark_jobs.topic_window`)


def check_block(index: int, docs: list[dict], key: bytes, reference_shapes: list[tuple[int, ...]] | None,
                layout: ConfiguredLayout, limits: SnapshotLimits, keep_weights: bool = False) -> CheckedBlock:
    """The partition ``index`` of a round: check each snapshot (`check_snapshot`), choose one per device
    (`choose_per_device`: a device's snapshots are all in ``docs``), and encode the chosen updates with their
    architecture's codec, all at once (`models.updates.federated_vectors`)."""
    choices = choose_per_device([check_snapshot(doc, key, reference_shapes, layout) for doc in docs], limits)
    chosen = [c for c in choices if c.update is not None]
    kinds = {(c.architecture or "").split("/")[0] for c in chosen}
    layouts = {tuple(np.shape(w) for w in c.update.weights) for c in chosen}
    like = chosen[0].update.weights if chosen else None
    if keep_weights or len(kinds) > 1 or len(layouts) > 1:
        return CheckedBlock(choices, None, None, like)
    matrix = (federated_vectors(codec_for(chosen[0].architecture), [c.update.weights for c in chosen]) if chosen
              else np.zeros((0, 0)))
    vectors = VectorBlock(index, [c.device_id for c in chosen], np.array([c.update.n_samples for c in chosen]),
                          matrix)
    weightless = [replace(c, update=replace(c.update, weights=[])) if c.update is not None else c for c in choices]
    return CheckedBlock(weightless, vectors, next(iter(kinds), None), like)


@dataclass
class BlockHead:
    """What the driver collects of a `CheckedBlock` (`block_head`): all but the vectors."""

    choices: list[DeviceChoice]
    kind: str | None
    like: list[np.ndarray] | None
    summary: BlockSummary | None
    unreadable: int = 0


def block_head(range_norm_ratio: float | None, block: CheckedBlock) -> BlockHead:
    """The choices, codec kind and layout of a block, and the summary of its vectors (`block_summary`)."""
    summary = block_summary(block.vectors, range_norm_ratio) if block.vectors is not None else None
    return BlockHead(block.choices, block.kind, block.like, summary, block.unreadable)


def partitioned_summaries(heads: list[BlockHead]) -> list[BlockSummary] | None:
    """The blocks' summaries when every chosen update of the round has one codec kind and one vector length (the
    round can aggregate in the partitions), else None."""
    if any(h.summary is None for h in heads):
        return None
    used = [h for h in heads if h.summary.device_ids]
    if len({h.kind for h in used}) > 1 or len({h.summary.length for h in used}) > 1:
        return None
    return [h.summary for h in heads]


def global_model_problem(weights: list[np.ndarray], global_weights: list[np.ndarray] | None, cfg) -> str | None:
    """A single update has no cohort to compare with (the REST API): its norm and direction are judged against
    the current global model instead, with the round's limits (`aggregation.max_norm_ratio`, `min_cosine`)."""
    if global_weights is None:
        return None
    vector, reference = flatten(weights), flatten(global_weights)
    ratio, min_cosine = cfg.aggregation.max_norm_ratio, cfg.aggregation.min_cosine
    norm, reference_norm = float(np.linalg.norm(vector)), float(np.linalg.norm(reference))
    if reference_norm > 0 and norm > ratio * reference_norm:
        return f"norm {norm:.4g} exceeds {ratio:g} × the global model's norm {reference_norm:.4g}"
    cosine = cosine_similarity(vector, reference)
    if reference_norm > 0 and cosine < min_cosine:
        return (f"cosine similarity {cosine:.3f} to the global model is below {min_cosine:g} (points away from "
                "it, e.g. a sign flip)")
    return None


def newest_verified_snapshot(db, device_id: str, key: bytes) -> dict | None:
    """A device's newest stored snapshot whose signature verifies (None if it has none): a forged document with a
    higher version, written straight into `local_models`, neither blocks the device's next snapshot (the REST API)
    nor stands for its local model (evaluation). Reads the device's snapshots newest first, lazily."""
    return next((d for d in db.local_models_newest_first(device_id) if stored_snapshot_verifies(d, key)), None)


def newest_verified_snapshots(db, device_ids, key: bytes) -> dict[str, dict]:
    """`newest_verified_snapshot` of many devices in few reads (devices without one are absent): the snapshots'
    ``_id, device_id, version``, then each device's newest not yet tried, together, until one verifies (two reads
    unless forged documents stand first). On the embedded server every read scans the collection: one read per
    device made an evaluation of 200 devices scan `local_models` 200 times."""
    heads = db.find("local_models", {"device_id": {"$in": list(device_ids)}}, ("_id", "device_id", "version"))
    untried: dict[str, list] = {}
    for head in sorted(heads, key=lambda h: h["version"] if isinstance(h.get("version"), int) else -1,
                       reverse=True):  # a version that is not an integer (a forged document) is tried last
        if isinstance(head["_id"], str):  # a snapshot's is "<device_id>:<version>"; a forged one may be anything
            untried.setdefault(head["device_id"], []).append(head["_id"])
    found: dict[str, dict] = {}
    while untried:
        device_of = {ids.pop(0): device_id for device_id, ids in untried.items()}
        for doc in db.find("local_models", {"_id": {"$in": list(device_of)}}):
            if stored_snapshot_verifies(doc, key) and doc["device_id"] == device_of.get(doc["_id"]):
                found[doc["device_id"]] = doc
        untried = {device_id: ids for device_id, ids in untried.items() if device_id not in found and ids}
    return found


def stored_snapshot_verifies(doc: dict, key: bytes) -> bool:
    """True when a stored snapshot's signature verifies under `key`."""
    return verify_record(wire_form(doc, SNAPSHOT_SCHEMA), key) is None


def previous_update(doc: dict | None) -> Update | None:
    """A device's stored snapshot as the reference its next one must follow (counters only)."""
    if doc is None or counters_problem(doc):
        return None
    return Update(str(doc["device_id"]), [], *(int(doc[name]) for name in ("n_samples", "version", "n_seen", "created_at")))
