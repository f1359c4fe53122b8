"""The false-positive rule: an operator's verdict on an incident becomes a per-device *mute pattern*.

Rule (docs/monitoring.md, "Feedback"). When an incident is marked ``false_positive``, its device keeps a pattern

    (metrics to blame b, with their shares; ratio ceiling C = peak_ratio x (1 + feedback.ratio_margin))

and from then on a reading the detector flags is *not* flagged (its score and threshold are kept, it opens no
incident) when both hold:

1. its score / threshold <= C: it is no worse than the false positive was (plus a margin for a model that moved), and
2. the cosine similarity between its own metrics-to-blame shares and b is >= ``feedback.min_similarity``: the same
   metrics explain it in about the same proportions.

So the same pattern stops alerting on that device, while a stronger anomaly (ratio above C) or one blamed on other
metrics still alerts, and other devices are untouched. A ``confirmed`` verdict adds nothing, and replaces an earlier
``false_positive`` verdict on the same incident (its pattern is removed). A device keeps at most
``feedback.max_patterns`` patterns (the oldest goes first); a pattern expires ``feedback.expire_days`` after its
verdict (0 = never). An incident without a ``peak_ratio`` (no threshold yet) gives no pattern.

The detector's threshold and normalisers are not changed: a pattern is a narrow exception, kept next to the
detector in the device's keyed state (a few hundred bytes), and it survives re-baselining after drift.

>>> settings = FeedbackSettings(ratio_margin=0.25, min_similarity=0.8, max_patterns=8, expire_days=30)
>>> feedback = {"incident_id": "dev-1:100", "verdict": "false_positive", "peak_ratio": 2.0,
...             "metrics_to_blame": [{"metric": "cpu", "share": 0.8}, {"metric": "mem", "share": 0.2}],
...             "created_at": 0}
>>> patterns = apply_feedback((), feedback, settings)
>>> muting_pattern(patterns, 2.2, [("cpu", 0.75), ("mem", 0.25)], 1000, settings).incident_id
'dev-1:100'
>>> muting_pattern(patterns, 2.6, [("cpu", 0.75), ("mem", 0.25)], 1000, settings) is None  # stronger: alerts
True
>>> muting_pattern(patterns, 2.2, [("disk", 0.9), ("cpu", 0.1)], 1000, settings) is None  # other metrics
True
>>> apply_feedback(patterns, {**feedback, "verdict": "confirmed"}, settings)
()
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

DAY_MS = 86_400_000


@dataclass(frozen=True)
class FeedbackSettings:
    """`feedback.*` of the configuration."""

    ratio_margin: float
    min_similarity: float
    max_patterns: int
    expire_days: float

    @classmethod
    def from_config(cls, cfg: Any) -> "FeedbackSettings":
        f = cfg.feedback
        return cls(ratio_margin=f.ratio_margin, min_similarity=f.min_similarity, max_patterns=f.max_patterns,
                   expire_days=f.expire_days)


@dataclass(frozen=True)
class MutePattern:
    """One false positive of a device: its blame shares, the ratio ceiling, and when the verdict was given."""

    incident_id: str
    blame: tuple[tuple[str, float], ...]
    max_ratio: float
    created_at: int

    def to_list(self) -> list:
        """Plain lists and numbers (for keyed state and JSON)."""
        return [self.incident_id, [list(item) for item in self.blame], self.max_ratio, self.created_at]

    @classmethod
    def from_list(cls, values: Sequence) -> "MutePattern":
        incident_id, blame, max_ratio, created_at = values
        return cls(incident_id, tuple((str(m), float(s)) for m, s in blame), float(max_ratio), int(created_at))


def blame_similarity(a: Iterable[tuple[str, float]], b: Iterable[tuple[str, float]]) -> float:
    """Cosine similarity of two metric → share maps (metrics missing from one count as 0); 0 if either is empty.

    >>> round(blame_similarity([("cpu", 1.0)], [("cpu", 0.5), ("mem", 0.5)]), 3)
    0.707
    """
    left, right = _shares(a), _shares(b)
    dot = sum(share * right.get(metric, 0.0) for metric, share in left.items())
    norm = math.sqrt(sum(s * s for s in left.values())) * math.sqrt(sum(s * s for s in right.values()))
    return dot / norm if norm > 0 else 0.0


def _shares(pairs: Iterable[tuple[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric, share in pairs:
        out[metric] = out.get(metric, 0.0) + float(share)
    return out


def _expired(pattern: MutePattern, now_ms: int, settings: FeedbackSettings) -> bool:
    return settings.expire_days > 0 and now_ms - pattern.created_at > settings.expire_days * DAY_MS


def apply_feedback(patterns: tuple[MutePattern, ...], feedback: Mapping[str, Any],
                   settings: FeedbackSettings) -> tuple[MutePattern, ...]:
    """A device's mute patterns after one `flead.feedback/1` record (`monitoring.records.decode_feedback`) about
    one of its incidents: the incident's earlier pattern is dropped, a ``false_positive`` adds the new one, expired
    patterns go, and at most ``max_patterns`` stay (newest kept)."""
    now = feedback["created_at"]
    kept = [p for p in patterns if p.incident_id != feedback["incident_id"] and not _expired(p, now, settings)]
    ratio = feedback.get("peak_ratio")
    if feedback["verdict"] == "false_positive" and ratio is not None and math.isfinite(ratio):
        blame = tuple((item["metric"], float(item["share"])) for item in feedback.get("metrics_to_blame") or [])
        kept.append(MutePattern(feedback["incident_id"], blame, ratio * (1.0 + settings.ratio_margin), now))
    kept.sort(key=lambda p: p.created_at)
    return tuple(kept[-settings.max_patterns:]) if settings.max_patterns > 0 else ()


def muting_pattern(patterns: Iterable[MutePattern], ratio: float, top_metrics: Iterable[tuple[str, float]],
                   now_ms: int, settings: FeedbackSettings) -> MutePattern | None:
    """The pattern that mutes a flagged reading with score / threshold `ratio` and these metrics to blame, or None."""
    top = list(top_metrics)
    for pattern in patterns:
        if (ratio <= pattern.max_ratio and not _expired(pattern, now_ms, settings)
                and blame_similarity(top, pattern.blame) >= settings.min_similarity):
            return pattern
    return None


def mute_mask(patterns: tuple[MutePattern, ...], scores: np.ndarray, thresholds: np.ndarray,
              is_anomaly: np.ndarray, top_metrics: Sequence[Iterable[tuple[str, float]]], now_ms: int,
              settings: FeedbackSettings) -> np.ndarray:
    """For a scored batch (`models.detector.DetectionResult` fields): True where a flagged reading is muted by one of
    the device's patterns. The stream job then sets ``is_anomaly`` to ``is_anomaly & ~mask`` before incidents are
    formed. Costs nothing for a device without patterns."""
    mask = np.zeros(len(scores), dtype=bool)
    if not patterns:
        return mask
    for i in np.flatnonzero(is_anomaly):
        threshold = thresholds[i]
        if threshold is None or not threshold > 0:
            continue
        mask[i] = muting_pattern(patterns, float(scores[i]) / float(threshold), top_metrics[i], now_ms,
                                 settings) is not None
    return mask
