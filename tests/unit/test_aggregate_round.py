"""The aggregation round without Spark or servers: snapshot checks (`spark_jobs.snapshots`) and the pure
`round_documents` of the aggregate job."""
import json
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from config import ConfigError, load_config
from models.aggregation import AggregationError
from models.integrity import AGGREGATOR_ISSUER, global_model_verdict, sign_record, verify_record, wire_form
from models.serialization import dumps, from_b64, loads, to_b64
from spark_jobs.aggregate_job import member_parts, round_documents
from spark_jobs.snapshots import (ConfiguredLayout, check_snapshot, choose_per_device, newest_verified_snapshots,
                                  snapshot_limits)

KEY = bytes(range(32))
METRICS = 5


def detector_shapes(cfg, n_metrics=METRICS):
    from models.detector import DeviceDetector
    return [w.shape for w in DeviceDetector.create([f"m{i}" for i in range(n_metrics)], cfg).get_weights()]


def stored_snapshot(device_id, weights, n_samples=100, version=1, n_seen=None, created_at=None, key=KEY,
                    architecture="dense_ae", **extra):
    record = {"schema": "flead.snapshot/1", "device_id": device_id, "version": version, "global_version": 0,
              "n_samples": n_samples, "n_seen": n_samples * version if n_seen is None else n_seen, "loss": 0.01,
              "weights": to_b64(dumps(weights, {"architecture": architecture, "model_version": version})),
              "created_at": created_at or 1_700_000_000_000 + version * 60_000, **extra}
    signed = sign_record(record, key) if key else record
    return {k: v for k, v in signed.items() if k != "schema"} | {"_id": f"{device_id}:{version}"}


def fleet(cfg, n=12, seed=0):
    rng = np.random.default_rng(seed)
    centre = [rng.normal(size=s) for s in detector_shapes(cfg)]
    return [stored_snapshot(f"dev-{i:02d}", [c + 0.05 * rng.normal(size=c.shape) for c in centre],
                            int(rng.integers(100, 300))) for i in range(n)]


def choices_for(cfg, docs, reference_shapes=None):
    layout = ConfiguredLayout(cfg)
    return choose_per_device([check_snapshot(d, KEY, reference_shapes, layout) for d in docs], snapshot_limits(cfg))


def test_snapshot_checks_name_each_problem():
    cfg = load_config()
    good = fleet(cfg, 1)[0]
    weights = loads(from_b64(good["weights"]))[0]
    cases = {
        "good": (good, None),
        "unsigned": (stored_snapshot("u", weights, key=None), "unsigned"),
        "other key": (stored_snapshot("f", weights, key=bytes(32)), "bad signature"),
        "n_samples edited after signing": ({**good, "n_samples": 2 ** 53}, "bad signature"),
        "no layout of the model": (stored_snapshot("w", [np.ones((5, 7)), np.ones(7), np.ones((7, 5))]), "weights"),
        "more learned than seen": (stored_snapshot("t", weights, n_samples=500, n_seen=100), "exceeds n_seen"),
        "counter missing": (stored_snapshot("c", weights, n_seen="many"), "n_seen: expected an integer"),
    }
    for name, (doc, expected) in cases.items():
        problem = check_snapshot(doc, KEY, None, ConfiguredLayout(cfg)).problem
        assert (problem is None) if expected is None else (expected in problem), (name, problem)


def test_a_model_too_wide_to_federate_is_refused_with_the_reason():
    """A subspace model of d inputs aggregates as a vector of d + d(d+1)/2 entries (devices of 1,000 metrics in
    windows of 5: 12.5 million, which exhausted Spark's default driver memory and failed every device's round):
    above `aggregation.max_vector_entries` a snapshot is refused, saying why, and narrower devices still count."""
    from models.detector import DeviceDetector

    cfg = load_config(env={"FLEAD_AGGREGATION_MAX_VECTOR_ENTRIES": "700"})
    problems = {}
    for n_metrics in (5, 6):  # with the time of day's 2 inputs, windows of 5: 35 inputs, 665 entries; 40, 860
        detector = DeviceDetector.create([f"m{i}" for i in range(n_metrics)], cfg)
        weights = detector.get_weights()
        doc = stored_snapshot(f"d{n_metrics}", weights, architecture=detector.architecture)
        problems[n_metrics] = check_snapshot(doc, KEY, None, ConfiguredLayout(cfg)).problem
    assert problems[5] is None
    assert "too wide to federate" in problems[6] and "40 inputs" in problems[6] and "860 entries" in problems[6]
    assert "max_vector_entries (700)" in problems[6]


def test_shapes_come_from_the_configured_model_when_there_is_no_global_model():
    cfg = load_config()
    assert ConfiguredLayout(cfg).shapes([np.zeros(s) for s in detector_shapes(cfg, 7)]) == detector_shapes(cfg, 7)
    lstm = load_config(env={"FLEAD_MODEL_KIND": "lstm_ae"})
    dense_weights = [np.zeros(s) for s in detector_shapes(cfg, 7)]
    weights = [np.zeros(s) for s in detector_shapes(lstm, 7)]
    assert ConfiguredLayout(lstm).shapes(weights) == detector_shapes(lstm, 7)
    doc = stored_snapshot("d", dense_weights)
    assert "wrong" in check_snapshot(doc, KEY, None, ConfiguredLayout(lstm)).problem   # a dense model where an LSTM is configured


def test_round_writes_a_signed_model_that_devices_adopt():
    cfg = load_config()
    docs = fleet(cfg)
    documents = round_documents(cfg, None, choices_for(cfg, docs), 1_700_000_999_000, KEY)
    model = documents.model
    assert model["version"] == 1 and model["previous_version"] == 0 and model["issuer"] == AGGREGATOR_ISSUER
    assert verify_record(model, KEY) is None
    assert global_model_verdict(model, KEY, 0, None, 10).adopt
    assert len(model["participants"]) == 12 and documents.history["norms"]["max"] > 0
    later = round_documents(cfg, {**model, "_id": 1}, choices_for(cfg, fleet(cfg, seed=1)), 1_700_001_999_000, KEY)
    assert later.model["version"] == 2 and later.model["previous_version"] == 1
    assert global_model_verdict(later.model, KEY, 1, 1, 10).adopt
    stored = {k: v for k, v in later.model.items() if k != "schema"} | {"_id": 2}
    assert json.loads(json.dumps(wire_form(stored, "flead.global-model/1"))) == later.model


def test_forged_snapshots_do_not_take_a_devices_place():
    cfg = load_config()
    docs = fleet(cfg)
    honest_weights = loads(from_b64(docs[0]["weights"]))[0]
    forged = stored_snapshot("dev-00", [100 * w for w in honest_weights], n_samples=2 ** 53, version=10 ** 6,
                             n_seen=10 ** 6 + 2 ** 53, key=bytes(32))
    documents = round_documents(cfg, None, choices_for(cfg, docs + [forged]), 1_700_000_999_000, KEY)
    assert "dev-00" in documents.model["participants"]
    reasons = [r["reason"] for r in documents.model["rejected"] if r["device_id"] == "dev-00"]
    assert reasons == ["v1000000: bad signature: the record was altered or signed with another key"]
    plain = round_documents(cfg, None, choices_for(cfg, docs), 1_700_000_999_000, KEY)
    assert loads(from_b64(documents.model["weights"]))[0][0].tolist() == \
        loads(from_b64(plain.model["weights"]))[0][0].tolist()


def test_a_forged_first_copy_of_a_version_does_not_hide_the_genuine_one():
    """The snapshots topic in offset order: a copy of dev-00's v1 signed with another key, then the genuine v1, then
    an identical redelivery of the genuine one. The genuine one takes part; the forged one is rejected."""
    from spark_jobs.topic_window import own_snapshots

    cfg = load_config()
    docs = fleet(cfg)
    genuine = docs[0]
    forged = stored_snapshot("dev-00", [100 * w for w in loads(from_b64(genuine["weights"]))[0]],
                             n_samples=genuine["n_samples"], key=bytes(32))
    values = [json.dumps(d).encode() for d in [forged, *docs, genuine]]
    window, _ = own_snapshots(values, 0, 1)
    documents = round_documents(cfg, None, choices_for(cfg, window), 1_700_000_999_000, KEY)
    assert "dev-00" in documents.model["participants"]
    assert [r["reason"] for r in documents.model["rejected"]] == [
        "v1: bad signature: the record was altered or signed with another key"]
    plain = round_documents(cfg, None, choices_for(cfg, docs), 1_700_000_999_000, KEY)
    assert documents.model["weights"] == plain.model["weights"]


def test_of_two_genuine_copies_of_a_version_the_first_counts():
    cfg = load_config()
    docs = fleet(cfg)
    second = stored_snapshot("dev-00", loads(from_b64(docs[1]["weights"]))[0], n_samples=docs[0]["n_samples"])
    choices = {c.device_id: c for c in choices_for(cfg, docs + [second])}
    assert choices["dev-00"].rejected == []
    assert [w.tolist() for w in choices["dev-00"].update.weights] == \
        [w.tolist() for w in loads(from_b64(docs[0]["weights"]))[0]]


def test_under_dp_nothing_per_device_or_unnoised_is_written():
    """Issue 17: with DP on, the round's documents carry counts, the noised model and ε only."""
    cfg = load_config(env={"FLEAD_PRIVACY_ENABLED": "true"})
    docs = fleet(cfg) + [stored_snapshot("broken", [np.ones((2, 2))])]
    documents = round_documents(cfg, None, choices_for(cfg, docs), 1_700_000_999_000, KEY)
    model, history = documents.model, documents.history
    written = json.dumps([model, history])
    for doc in docs:
        assert doc["device_id"] not in written
    assert model["participants"] == [] and model["rejected"] == [] and documents.rejected == []
    assert model["n_participants"] == 12 and model["n_rejected"] == 1
    for field in ("norms", "update_norms", "mean_loss", "participants", "rejected", "n_samples"):
        assert field not in history
    assert history["dp_epsilon"] == model["dp_epsilon"] == model["dp"]["epsilon"] > 0
    assert history["dp_round_epsilon"] == pytest.approx(model["dp_epsilon"]) and history["dp_rounds"] == 1
    second = round_documents(cfg, {**model, "_id": 1}, choices_for(cfg, fleet(cfg, seed=2)), 1_700_001_999_000, KEY)
    assert second.model["dp"]["rounds"] == 2 and second.model["dp_epsilon"] > model["dp_epsilon"]
    assert second.history["dp_round_epsilon"] == pytest.approx(history["dp_round_epsilon"])


def test_too_few_usable_updates_raise_with_the_reasons():
    cfg = load_config()
    docs = fleet(cfg, 1) + [stored_snapshot("bad", [np.ones(3)], key=None)]
    with pytest.raises(AggregationError, match="needs at least 2.*bad: v1: unsigned"):
        round_documents(cfg, None, choices_for(cfg, docs), int(time.time() * 1000), KEY)


def test_a_registered_codec_decides_the_space_of_the_average():
    """The hook for model kinds whose weights do not average as they are (e.g. a low-rank factor)."""
    from models.updates import _CODECS, IDENTITY, flatten, register_codec, unflatten

    class Doubling:   # a toy codec: averages 2·w, rebuilds w
        def federated_vector(self, weights):
            return 2 * flatten(weights)

        def weights_from_vector(self, vector, like):
            return unflatten(vector / 2, like)

        def vector_length(self, shapes):
            return IDENTITY.vector_length(shapes)

    cfg = load_config()
    docs = fleet(cfg, 4)
    plain = round_documents(cfg, None, choices_for(cfg, docs), 1_700_000_999_000, KEY)
    register_codec("dense_ae", Doubling)
    try:
        coded = round_documents(cfg, None, choices_for(cfg, docs), 1_700_000_999_000, KEY)
    finally:
        del _CODECS["dense_ae"]
    for a, b in zip(loads(from_b64(plain.model["weights"]))[0], loads(from_b64(coded.model["weights"]))[0]):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert plain.history["norms"]["max"] * 2 == pytest.approx(coded.history["norms"]["max"])  # norms in its space


class MemoryLocalModels:
    """`local_models` in memory, with what `newest_verified_snapshots` asks of a Store (and the reads it made)."""

    def __init__(self, docs):
        self.docs, self.reads = docs, 0

    def find(self, key, query, fields=None):
        assert key == "local_models"
        self.reads += 1
        (name, condition), = query.items()
        hits = [d for d in self.docs if d.get(name) in condition["$in"]]
        return [{k: d[k] for k in fields if k in d} if fields else dict(d) for d in hits]


def test_each_devices_newest_verified_snapshot_comes_from_few_reads_whatever_is_forged():
    honest = [stored_snapshot(f"dev-{d}", [np.zeros(2)], version=v) for d in range(3) for v in (1, 2, 3)]
    forged = [stored_snapshot("dev-0", [np.ones(2)], version=v, key=bytes(32)) for v in (7, 8)]  # above the genuine
    hostile = [{"_id": {"not": "a string"}, "device_id": "dev-1", "version": 99},
               {"_id": "dev-2:x", "device_id": "dev-2", "version": "high"}]
    db = MemoryLocalModels(honest + forged + hostile)

    found = newest_verified_snapshots(db, ["dev-0", "dev-1", "dev-2", "dev-9"], KEY)

    assert {d: doc["_id"] for d, doc in found.items()} == {"dev-0": "dev-0:3", "dev-1": "dev-1:3",
                                                            "dev-2": "dev-2:3"}
    assert db.reads == 4  # the heads, then dev-0's two forged layers and its genuine newest beside the others


def test_a_rounds_documents_list_at_most_the_configured_number_of_devices_and_count_them_all():
    cfg = load_config(env={"FLEAD_AGGREGATION_LISTED_DEVICES": "3"})
    docs = fleet(cfg)
    forged = stored_snapshot("dev-00", loads(from_b64(docs[0]["weights"]))[0], version=9, key=bytes(32))
    documents = round_documents(cfg, None, choices_for(cfg, docs + [forged]), 1_700_000_999_000, KEY)
    model, history = documents.model, documents.history
    assert (model["n_participants"], len(model["participants"]), len(history["participants"])) == (12, 3, 3)
    assert len(history["update_norms"]) == 3 and model["n_rejected"] == 1 and len(model["rejected"]) == 1
    assert verify_record(model, KEY) is None  # signed as it is sent


@given(st.lists(st.text(min_size=1, max_size=30), unique=True, max_size=60), st.integers(1, 200))
def test_member_parts_keep_every_member_once_in_order_within_the_budget(members, budget):
    parts = member_parts(members, budget)
    assert [m for part in parts for m in part] == members and parts and all(parts[1:])
    assert all(len(json.dumps(part)) <= budget for part in parts if len(part) > 1)


def test_a_large_clusters_model_comes_in_parts_whose_members_add_up():
    """A cluster model lists every member (they adopt it); 700,000 ids would outgrow a document and a message, so
    the members are spread over records of at most `aggregation.cluster_members_bytes`, each signed."""
    cfg = load_config(env={"FLEAD_AGGREGATION_STRATEGY": "clustered", "FLEAD_AGGREGATION_CLUSTERS": "2",
                           "FLEAD_AGGREGATION_CLUSTER_MEMBERS_BYTES": "30", "FLEAD_AGGREGATION_MIN_COSINE": "-1"})
    documents = round_documents(cfg, None, choices_for(cfg, fleet(cfg)), 1_700_000_999_000, KEY)
    by_cluster: dict[int, list[dict]] = {}
    for record in documents.clusters:
        assert verify_record(record, KEY) is None and len(json.dumps(record["members"])) <= 30
        by_cluster.setdefault(record["cluster"], []).append(record)
    assert sorted(by_cluster) == [0, 1] and any(len(parts) > 1 for parts in by_cluster.values())
    for k, parts in by_cluster.items():
        assert [p["part"] for p in parts] == list(range(len(parts))) and {p["parts"] for p in parts} == {len(parts)}
        assert {p["weights"] for p in parts} == {parts[0]["weights"]}
        assert sum(len(p["members"]) for p in parts) == documents.model["cluster_sizes"][k]
    assert sorted(m for r in documents.clusters for m in r["members"]) == sorted(d["device_id"] for d in fleet(cfg))


@pytest.mark.parametrize("budget", ["0", "10485760"])
def test_a_members_budget_that_would_make_a_record_per_member_or_one_too_large_to_send_is_refused(budget):
    cfg = load_config(env={"FLEAD_AGGREGATION_STRATEGY": "clustered", "FLEAD_AGGREGATION_CLUSTERS": "2",
                           "FLEAD_AGGREGATION_CLUSTER_MEMBERS_BYTES": budget, "FLEAD_AGGREGATION_MIN_COSINE": "-1"})
    with pytest.raises(ConfigError, match="aggregation.cluster_members_bytes"):
        round_documents(cfg, None, choices_for(cfg, fleet(cfg)), 1_700_000_999_000, KEY)
