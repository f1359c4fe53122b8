"""Secure aggregation with X25519-agreed pairwise masks: device side, aggregator side, and a whole-round simulation
over everything that would be stored."""
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from models.aggregation import FedAvg, ValidationPolicy, fedavg, make_strategy
from models.secure_aggregation import (Cohort, SecureAggregation, SecureRound, decode_words, encode_words,
                                       generate_key_pair, masked_update, pair_seed, reveal_pair_seeds, secure_fedavg,
                                       unmask_sum)
from models.updates import AggregationError, Update, flatten

LENGTH = 40


def key_pair(rng):
    """An X25519 key pair (private, public) drawn from the test's seeded generator, not OS entropy as
    `generate_key_pair` does: the statistical checks of a round then see the same masks on every run, instead of
    failing by chance about once in a thousand runs."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    private = X25519PrivateKey.from_private_bytes(rng.bytes(32))
    return private.private_bytes_raw(), private.public_key().public_bytes_raw()


def round_of(n, seed=0, length=LENGTH):
    """Keys, cohort, plain vectors and weights of n devices, all from `seed`."""
    rng = np.random.default_rng(seed)
    keys = {f"dev-{i}": key_pair(rng) for i in range(n)}
    cohort = Cohort("r7", {d: pub for d, (_, pub) in keys.items()}, length=length + 1)
    vectors = {d: rng.normal(size=length) for d in keys}
    weights = {d: float(rng.integers(10, 500)) for d in keys}
    return keys, cohort, vectors, weights


def mask_all(keys, cohort, vectors, weights, devices=None):
    return {d: masked_update(vectors[d], weights[d], d, keys[d][0], cohort) for d in (devices or keys)}


def plain_sum(vectors, weights, devices):
    return sum(np.append(weights[d] * vectors[d], weights[d]) for d in devices)


def test_pair_seeds_agree_between_the_two_devices_only():
    keys, cohort, _, _ = round_of(3)
    a, b, c = sorted(keys)
    ab = pair_seed(keys[a][0], keys[b][1], "r7", a, b)
    assert ab == pair_seed(keys[b][0], keys[a][1], "r7", b, a)
    assert ab != pair_seed(keys[a][0], keys[c][1], "r7", a, c)
    assert ab != pair_seed(keys[a][0], keys[b][1], "r8", a, b)   # bound to the round


@settings(max_examples=10, deadline=None)
@given(st.integers(2, 7), st.integers(0, 1000))
def test_unmasked_sum_equals_the_plain_sum(n, seed):
    keys, cohort, vectors, weights = round_of(n, seed)
    total = unmask_sum(mask_all(keys, cohort, vectors, weights), cohort)
    np.testing.assert_allclose(total, plain_sum(vectors, weights, keys), atol=n * 2.0 ** -23)


def test_dropouts_are_recovered_from_the_seeds_survivors_reveal():
    keys, cohort, vectors, weights = round_of(6)
    dropped = ["dev-2", "dev-5"]
    survivors = [d for d in keys if d not in dropped]
    masked = mask_all(keys, cohort, vectors, weights, survivors)
    with pytest.raises(AggregationError, match="dropped out"):
        unmask_sum(masked, cohort)
    revealed = {d: reveal_pair_seeds(d, keys[d][0], cohort, dropped) for d in survivors}
    assert all(set(seeds) == set(dropped) for seeds in revealed.values())   # nothing about survivor pairs
    np.testing.assert_allclose(unmask_sum(masked, cohort, revealed), plain_sum(vectors, weights, survivors),
                               atol=1e-5)


def chi_square_uniform_bytes(words: np.ndarray) -> float:
    """p-value of a chi-square test that the bytes of ``words`` are uniform over 0..255."""
    from scipy.stats import chisquare

    counts = np.bincount(np.asarray(words, dtype="<u8").view(np.uint8), minlength=256)
    return float(chisquare(counts).pvalue)


def test_whole_round_simulation_over_all_stored_data():
    """Issue 17 'done when': every stored masked document looks uniform, no device's update can be recovered
    from all stored data, and the unmasked sum equals plain FedAvg within the fixed-point tolerance."""
    n, length = 6, 2000
    keys, cohort, vectors, weights = round_of(n, seed=3, length=length)
    # A real-looking update: small weights near a shared model, so a leak would be visible.
    base = np.random.default_rng(9).normal(size=length)
    vectors = {d: base + 0.01 * v for d, v in vectors.items()}
    stored_documents = {d: encode_words(masked_update(vectors[d], weights[d], d, keys[d][0], cohort)) for d in keys}
    announcement = {"round": cohort.round_id, "members": {d: pub.hex() for d, pub in cohort.members.items()}}

    # 1. each stored masked vector is indistinguishable from uniform words (chi-square on its bytes)
    masked = {d: decode_words(text, cohort.length) for d, text in stored_documents.items()}
    p_values = [chi_square_uniform_bytes(words) for words in masked.values()]
    assert min(p_values) > 1e-4, p_values
    plain_words = np.round(np.append(vectors["dev-0"], 1.0) * 2 ** 24).astype(np.int64).view(np.uint64)
    assert chi_square_uniform_bytes(plain_words) < 1e-12   # the same test does see an unmasked update

    # 2. no device's update (or any strict subset's sum) can be read off the stored data: only the whole
    #    cohort's masks cancel, and no private key or pair seed is stored
    for size in range(1, n):
        for subset in itertools.combinations(sorted(masked), size):
            values = sum(masked[d] for d in subset).view(np.int64).astype(np.float64) / 2 ** 24
            truth = plain_sum(vectors, weights, subset)
            assert np.median(np.abs(values - truth)) > 1e6, subset
            assert abs(np.corrcoef(values[:-1], truth[:-1])[0, 1]) < 0.1, subset
    stored_bytes = "".join(stored_documents.values()) + str(announcement)
    for device, (private, _) in keys.items():
        assert private.hex() not in stored_bytes
        for peer in keys:
            if peer != device:
                assert pair_seed(private, cohort.members[peer], "r7", device, peer).hex() not in stored_bytes

    # 3. the aggregator's unmasked sum gives FedAvg within the fixed-point tolerance
    total = unmask_sum(masked, cohort)
    expected = fedavg([([vectors[d]], weights[d]) for d in keys])[0]
    tolerance = n * 2.0 ** -24 / sum(weights.values()) * 4
    np.testing.assert_allclose(total[:-1] / total[-1], expected, atol=max(tolerance, 1e-9))


def test_secure_strategy_equals_fedavg_and_refuses_outsiders():
    keys, cohort, vectors, weights = round_of(5)
    updates = [Update(d, [masked_update(vectors[d], weights[d], d, keys[d][0], cohort)], 1) for d in keys]
    updates.append(Update("intruder", [np.zeros(cohort.length, dtype=np.uint64)], 1))
    strategy = SecureAggregation(FedAvg(policy=ValidationPolicy(2, None, None, None, None)), SecureRound(cohort))
    result = strategy.aggregate(updates)
    expected = fedavg([([vectors[d]], weights[d]) for d in keys])[0]
    np.testing.assert_allclose(flatten(result.weights), expected, atol=1e-6)
    assert result.strategy == "secure-fedavg" and result.norms == {}
    assert result.rejected == [("intruder", "not in the cohort of round r7")]


def test_secure_fedavg_in_one_process_equals_fedavg():
    rng = np.random.default_rng(5)
    updates = [Update(f"d{i}", [rng.normal(size=(3, 2)), rng.normal(size=2)], int(rng.integers(1, 500)))
               for i in range(5)]
    np.testing.assert_allclose(flatten(secure_fedavg(updates)),
                               flatten(fedavg([(u.weights, u.n_samples) for u in updates])), atol=1e-6)


def test_what_cannot_be_masked_is_refused():
    keys, cohort, vectors, weights = round_of(2)
    with pytest.raises(ValueError, match="non-finite"):
        masked_update(np.full(LENGTH, np.nan), 1.0, "dev-0", keys["dev-0"][0], cohort)
    with pytest.raises(ValueError, match="not in the cohort"):
        masked_update(vectors["dev-0"], 1.0, "zz", keys["dev-0"][0], cohort)
    with pytest.raises(ValueError, match="wrap around"):
        masked_update(np.full(LENGTH, 1e30), 1.0, "dev-0", keys["dev-0"][0], cohort)
    assert cohort.max_abs() * 2 ** 24 * len(cohort.members) <= 2 ** 62


@pytest.mark.parametrize("strategy", ["median", "trimmed_mean", "clustered"])
def test_strategies_needing_individual_updates_refuse_secure_aggregation(strategy):
    from config import load_config

    cfg = load_config(env={"FLEAD_PRIVACY_SECURE_AGGREGATION": "true", "FLEAD_AGGREGATION_STRATEGY": strategy})
    with pytest.raises(AggregationError, match="reveals only the sum"):
        make_strategy(cfg)
    with pytest.raises(AggregationError, match="cannot run"):
        SecureAggregation(FedAvg(), SecureRound(Cohort("r", {}, 1)))
    assert math.isfinite(Cohort("r", {}, 1).max_abs())


def test_device_records_are_valid_snapshots_and_round_trip():
    """Enrolment, masked answer and seed reveal are `flead.snapshot/1` records every reader of the format takes."""
    from models.secure_aggregation import (answer_cohort, answer_dropouts, choose_cohort, cohort_from_record,
                                           enrolment_record)
    from telemetry.schema import SNAPSHOT

    keys = {d: generate_key_pair() for d in ("a", "b", "c")}
    shapes = [(2, 3), (3,)]
    enrolments = [enrolment_record(d, pub, 9, shapes, 1, 10, 1000 + i) for i, (d, (_, pub)) in enumerate(keys.items())]
    enrolments.append(enrolment_record("odd", generate_key_pair()[1], 5, [(5,)], 1, 10, 2000))   # another layout
    record = choose_cohort(enrolments, "r1.1", 0, 1000, 3000, "flead-aggregator")
    assert sorted(record["members"]) == ["a", "b", "c"] and record["length"] == 10 and record["shapes"] == ["2x3", "3"]
    assert cohort_from_record(record).members["b"] == keys["b"][1]
    answer = answer_cohort(record, "a", keys["a"][0], np.ones(9), 50, 2, 60, 4000)
    assert answer_cohort(record, "odd", keys["a"][0], np.ones(9), 50, 2, 60, 4000) is None
    reveal = answer_dropouts({**record, "dropped": ["c"]}, "a", keys["a"][0], 5000, 3, 61)
    assert [entry["device_id"] for entry in reveal["revealed_seeds"]] == ["c"]
    for r in (*enrolments, answer, reveal):
        SNAPSHOT.check(dict(r))


def test_a_cohort_is_at_most_the_configured_size_drawn_at_random():
    """Every member masks once per other member (~87 µs per pair here): a cohort of a 10,000-device fleet would cost
    the stream job 2.4 hours of CPU per round. `privacy.secure_cohort_size` members are drawn, the rest answer later."""
    import random

    from models.secure_aggregation import choose_cohort, enrolment_record

    enrolments = [enrolment_record(f"d{i:02d}", generate_key_pair()[1], 9, [(9,)], 1, 10, 1000) for i in range(30)]
    cohorts = [set(choose_cohort(enrolments, f"r{k}.1", 0, 1000, 3000, "flead-aggregator", 10,
                                 random.Random(k))["members"]) for k in range(3)]
    assert all(len(c) == 10 and c <= {e["device_id"] for e in enrolments} for c in cohorts)
    assert len(set(map(frozenset, cohorts))) == 3  # another draw each round
    assert len(choose_cohort(enrolments, "r9.1", 0, 1000, 3000, "flead-aggregator", 30)["members"]) == 30


def test_device_records_pass_the_sink_with_real_device_ids():
    """The sink stores snapshots only if every field name is a plain identifier: device ids such as ``omi-12``
    travel as values (a seed reveal keyed by device id was refused by the sink, so dropout recovery never completed
    in the real pipeline); malformed reveal entries are skipped by the aggregator, not fatal."""
    from models.secure_aggregation import (answer_cohort, answer_dropouts, choose_cohort, cohort_from_record,
                                           enrolment_record, revealed_from_records)
    from models.integrity import sign_record
    from storage.sink import event_document

    keys = {d: generate_key_pair() for d in ("omi-1", "omi-10", "omi-12")}
    enrolments = [enrolment_record(d, pub, 4, [(4,)], 1, 10, 1000) for d, (_, pub) in keys.items()]
    record = {**choose_cohort(enrolments, "r1.1", 0, 1000, 3000, "flead-aggregator"), "dropped": ["omi-12"]}
    answer = answer_cohort(record, "omi-1", keys["omi-1"][0], np.ones(4), 50, 2, 60, 4000)
    reveal = answer_dropouts(record, "omi-1", keys["omi-1"][0], 5000, 3, 61)
    key = bytes(32)
    for r in (*enrolments, answer, reveal):
        assert event_document("snapshots", sign_record(r, key), "p", key)["device_id"] == r["device_id"]
    cohort = cohort_from_record(record)
    revealed = revealed_from_records([reveal], cohort)
    assert revealed == {"omi-1": {"omi-12": pair_seed(keys["omi-1"][0], keys["omi-12"][1], "r1.1", "omi-1", "omi-12")}}
    hostile = {**reveal, "device_id": "omi-10", "revealed_seeds": [{"device_id": "omi-12", "seed": "zz" * 32}, "x",
                                                                   {"device_id": "nobody", "seed": "00" * 32}]}
    assert revealed_from_records([hostile], cohort) == {"omi-10": {}}
    with pytest.raises(ValueError, match="malformed"):
        cohort_from_record({"round_id": "r", "members": {"a": "not base64!"}, "length": 2, "fixed_point_bits": 24})


def test_a_secure_round_of_subspace_models_unmasks_in_the_codecs_space():
    """The subspace kind masks its federated vector (mean + covariance), not its wire factor: the enrolment names
    the architecture, the cohort carries it, and the round rebuilds wire weights through that codec (before, the
    aggregator took the identity codec and failed: "a vector of 4655 numbers does not fit layers of 1710")."""
    import time

    from config import load_config
    from models.detector import DeviceDetector
    from models.integrity import sign_record
    from models.secure_aggregation import answer_cohort, choose_cohort, cohort_from_record, enrolment_record
    from models.serialization import from_b64, loads
    from models.updates import codec_for
    from spark_jobs.aggregate_job import round_documents
    from spark_jobs.snapshots import DeviceChoice

    cfg = load_config(env={"FLEAD_PRIVACY_SECURE_AGGREGATION": "true"})
    rng = np.random.default_rng(17)
    detectors = {}
    for i in range(3):
        detector = DeviceDetector.create([f"m{j}" for j in range(5)], cfg)
        detector.learn_many(rng.normal(size=(300, 5)) @ rng.normal(size=(5, 5)), ts=60_000 * np.arange(300))
        detectors[f"omi-{i}"] = detector
    architecture = next(iter(detectors.values())).architecture
    codec = codec_for(architecture)
    keys = {d: generate_key_pair() for d in detectors}
    vectors = {d: codec.federated_vector(det.get_weights()) for d, det in detectors.items()}
    shapes = [w.shape for w in detectors["omi-0"].get_weights()]
    assert vectors["omi-0"].size != sum(int(np.prod(s)) for s in shapes)   # not the identity codec's space
    enrolments = [enrolment_record(d, keys[d][1], vectors[d].size, shapes, 1, 300, 1000, architecture)
                  for d in detectors]
    record = choose_cohort(enrolments, "r1.1", 0, 1000, 2000, "flead-aggregator")
    assert record["architecture"] == architecture
    cohort = cohort_from_record(record)
    choices = []
    for d in detectors:
        answer = answer_cohort(record, d, keys[d][0], vectors[d], 100 + 50 * int(d[-1]), 2, 400, 3000)
        words = decode_words(answer["weights"], cohort.length)
        choices.append(DeviceChoice(d, Update(d, [words], answer["n_samples"], 2, 400, 3000),
                                    architecture=record["architecture"]))
    documents = round_documents(cfg, None, choices, int(time.time() * 1000), bytes(32),
                                SecureRound(cohort, {}, shapes))
    weights, _ = loads(from_b64(documents.model["weights"]))
    assert [w.shape for w in weights] == shapes
    expected_vector = sum((100 + 50 * int(d[-1])) * vectors[d] for d in detectors) / sum(100 + 50 * i for i in range(3))
    expected = codec.weights_from_vector(expected_vector, detectors["omi-0"].get_weights())
    for got, want in zip(weights, expected):
        np.testing.assert_allclose(got, want, atol=1e-4)
