"""The false-positive rule (`scoring.feedback`) on a real `DeviceDetector`: marking an incident a false
positive stops the same pattern from alerting on that device; a confirmed verdict changes nothing; a stronger or
differently blamed anomaly still alerts. Plus properties of `apply_feedback`."""
import numpy as np
from hypothesis import given, strategies as st

from config import load_config
from models.detector import DeviceDetector
from scoring.feedback import FeedbackSettings, MutePattern, apply_feedback, blame_similarity, mute_mask

METRICS = [f"m{i}" for i in range(6)]
SETTINGS = FeedbackSettings(ratio_margin=0.25, min_similarity=0.8, max_patterns=8, expire_days=30)
BATCH = 16


def normal(rng, n, start):
    t = np.arange(start, start + n)[:, None]
    return 0.5 + 0.1 * np.sin(t / 50 + np.arange(6)) + rng.normal(0, 0.02, size=(n, 6))


def with_spike(X, metric, size):
    X = X.copy()
    X[:, metric] += size
    return X


def run(detector, X):
    """process_many in micro-batches as the stream job does; returns the concatenated results."""
    scores, thresholds, flags, tops = [], [], [], []
    for i in range(0, len(X), BATCH):
        res = detector.process_many(X[i:i + BATCH],
                                    ts=300_000 * (detector.n_seen + np.arange(len(X[i:i + BATCH]))))
        scores += res.scores.tolist()
        thresholds += res.thresholds.tolist()
        flags += res.is_anomaly.tolist()
        tops += res.top_metrics
    return np.array(scores), np.array(thresholds), np.array(flags), tops


def incident_of(scores, thresholds, flags, tops, incident_id):
    """What an incident of these flagged readings says: peak score / threshold and the blame shares (mean share of
    each metric over the flagged readings)."""
    flagged = np.flatnonzero(flags)
    shares: dict[str, float] = {}
    for i in flagged:
        for metric, share in tops[i]:
            shares[metric] = shares.get(metric, 0.0) + share / len(flagged)
    blame = [{"metric": m, "share": min(1.0, s)} for m, s in sorted(shares.items(), key=lambda kv: -kv[1])]
    return {"incident_id": incident_id, "peak_ratio": float(max(scores[flagged] / thresholds[flagged])),
            "metrics_to_blame": blame}


def feedback(incident, verdict, at=0):
    return {**incident, "verdict": verdict, "created_at": at}


def trained_detector(rng):
    detector = DeviceDetector.create(METRICS, load_config(env={}), seed=0)
    run(detector, normal(rng, 5000, 0))
    return detector


def test_a_false_positive_stops_the_same_pattern_and_only_it():
    rng = np.random.default_rng(7)
    detector = trained_detector(rng)
    first = run(detector, with_spike(normal(rng, 8, 5000), metric=2, size=0.5))
    assert first[2].sum() >= 1, "the injected pattern must be flagged for this test to mean anything"
    incident = incident_of(*first, "dev:5000")
    assert incident["metrics_to_blame"][0]["metric"] == "m2"
    run(detector, normal(rng, 600, 5008))

    patterns = apply_feedback((), feedback(incident, "false_positive"), SETTINGS)
    confirmed = apply_feedback((), feedback(incident, "confirmed"), SETTINGS)
    assert len(patterns) == 1 and confirmed == ()

    twin = DeviceDetector.from_bytes(detector.to_bytes())  # the same device state, for a second replay
    replay = run(detector, with_spike(normal(rng, 8, 5608), metric=2, size=0.5))
    assert replay[2].sum() >= 1, "control: without feedback the replayed pattern alerts again"
    muted = mute_mask(patterns, replay[0], replay[1], replay[2], replay[3], 1_000, SETTINGS)
    assert (replay[2] & ~muted).sum() == 0, "after a false-positive verdict it opens no incident"
    assert not mute_mask(confirmed, replay[0], replay[1], replay[2], replay[3], 1_000, SETTINGS).any()

    other_metric = run(twin, with_spike(normal(rng, 8, 5608), metric=4, size=0.5))
    assert other_metric[2].sum() >= 1
    assert not mute_mask(patterns, *other_metric, 1_000, SETTINGS).any(), "another metric's anomaly still alerts"

    stronger = run(DeviceDetector.from_bytes(twin.to_bytes()), with_spike(normal(rng, 8, 3616), metric=2, size=5.0))
    flagged = np.flatnonzero(stronger[2])
    assert len(flagged) and not mute_mask(patterns, *stronger, 1_000, SETTINGS)[flagged].all(), \
        "a much stronger anomaly on the same metric still alerts"


def test_patterns_expire_and_a_device_keeps_a_bounded_number():
    blame = [{"metric": "m0", "share": 1.0}]
    patterns = ()
    for i in range(20):
        patterns = apply_feedback(patterns, {"incident_id": f"d:{i}", "verdict": "false_positive", "peak_ratio": 2.0,
                                             "metrics_to_blame": blame, "created_at": i}, SETTINGS)
    assert [p.incident_id for p in patterns] == [f"d:{i}" for i in range(12, 20)]
    scores, thresholds, flags = np.array([1.5]), np.array([1.0]), np.array([True])
    assert mute_mask(patterns, scores, thresholds, flags, [[("m0", 1.0)]], 100, SETTINGS).all()
    month = 31 * 86_400_000
    assert not mute_mask(patterns, scores, thresholds, flags, [[("m0", 1.0)]], month, SETTINGS).any()
    assert MutePattern.from_list(patterns[0].to_list()) == patterns[0]


verdicts = st.lists(st.tuples(st.integers(0, 5), st.sampled_from(["false_positive", "confirmed"]),
                              st.floats(0.5, 50)), max_size=40)


@given(verdicts)
def test_apply_feedback_properties(steps):
    patterns, latest = (), {}
    for t, (incident, verdict, ratio) in enumerate(steps):
        record = {"incident_id": f"d:{incident}", "verdict": verdict, "peak_ratio": ratio, "created_at": t,
                  "metrics_to_blame": [{"metric": "m0", "share": 1.0}]}
        patterns = apply_feedback(patterns, record, SETTINGS)
        assert apply_feedback(patterns, record, SETTINGS) == patterns  # a repeated record changes nothing
        latest[record["incident_id"]] = (verdict, ratio)
        assert len(patterns) <= SETTINGS.max_patterns
        ids = [p.incident_id for p in patterns]
        assert len(ids) == len(set(ids))  # one pattern per incident: the newest verdict
        for p in patterns:
            assert latest[p.incident_id][0] == "false_positive"
            assert p.max_ratio == latest[p.incident_id][1] * (1 + SETTINGS.ratio_margin)


@given(st.dictionaries(st.sampled_from(METRICS), st.floats(0, 1), max_size=6),
       st.dictionaries(st.sampled_from(METRICS), st.floats(0, 1), max_size=6))
def test_blame_similarity_is_a_symmetric_cosine(a, b):
    s = blame_similarity(a.items(), b.items())
    assert -1e-9 <= s <= 1 + 1e-9
    assert abs(s - blame_similarity(b.items(), a.items())) < 1e-9
