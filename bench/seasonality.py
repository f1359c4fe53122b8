"""Does a fleet follow the clock? Label-free evidence for the time-of-day inputs, from its training data alone.

`model.features.time_of_day` gives the detector the phase of each reading's event time in the UTC day, and
`model.features.time_of_day_harmonics` how many harmonics of it (docs/evaluation.md, items 15 and 17). Whether a
fleet needs them is a property of its own training data, which this bench measures; it reads no label. For each
device of a multi-entity training CSV (ASD's by default; ``--train`` for any fleet in the same format), over the
metrics that vary, the median of:

- ``acf_*``: the autocorrelation at half a day, 1, 6, 7 and 8 days of the device's timestamps (a day is
  `models.features.readings_per_day`: readings at the median interval of its timestamps); a weekly pattern shows
  as 7 days above 6 and 8;
- ``profile_share``: the share of a metric's variance held by its daily mean profile (its mean at each time of day,
  in slots of one interval), and ``profile_share_chance``, the same with the readings' slots shuffled (what a
  profile of that many slots holds by chance: the floor);
- ``harmonics_1`` .. ``harmonics_4``: the share of the profile's power in its first 1, 2, 3, 4 harmonics (what 1..4
  `time_of_day_harmonics` can represent linearly);
- ``cycle_days``: the metrics' period, in the timestamps' days: the first peak of their mean autocorrelation that
  reaches `PERIOD_PEAK_SHARE` of its highest, after it first falls below 0 (about 1 when the clock and the load
  agree; far from 1 when the timestamps' interval is not the sampling interval, and then the time-of-day inputs
  describe no cycle of the data: set them off).

Headline: the fleet's median `profile_share` beside its median `profile_share_chance` as the floor.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench_output import (stop_cleanly_on_sigterm, training_fleet, training_fleet_parser,  # noqa: E402
                          write_json)  # beside this script
from models.features import DAY_MS, readings_per_day  # noqa: E402

LAGS_DAYS = (0.5, 1, 6, 7, 8)
HARMONICS = 4
SEED = 5
MIN_READINGS = 2000          # fewer than a few days of readings say nothing about a daily cycle
QUICK = (4, 5000)            # --quick: devices, readings of each
PERIOD_PEAK_SHARE = 0.9      # the period is the first autocorrelation peak this close to the highest (pitch detection's
                             # rule: a multiple of the period peaks about as high)


def moving(X: np.ndarray) -> np.ndarray:
    """Columns of `X` that vary (a constant metric has no cycle), with missing values filled by the column mean."""
    X = np.asarray(X, dtype=np.float64)
    X = np.where(np.isnan(X), np.nanmean(np.where(np.isnan(X).all(0), 0.0, X), axis=0), X)
    return X[:, np.std(X, axis=0) > 0]


def autocorrelation(x: np.ndarray, lag: int) -> float:
    """Pearson correlation of `x` with itself `lag` readings later (nan when too short or constant)."""
    if lag <= 0 or lag >= len(x) - 2:
        return float("nan")
    a, b = x[:-lag], x[lag:]
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def slots_of_day(ts: np.ndarray, per_day: int) -> np.ndarray:
    """Each reading's slot in the UTC day (0 .. per_day - 1), at `per_day` slots a day."""
    return ((np.asarray(ts, dtype=np.int64) % DAY_MS) * per_day // DAY_MS).astype(np.int64)


def daily_profiles(X: np.ndarray, slots: np.ndarray, per_day: int) -> np.ndarray:
    """(per_day, metrics): each metric's mean at each slot of the day; nan where no reading fell."""
    sums = np.zeros((per_day, X.shape[1]))
    np.add.at(sums, slots, X)
    counts = np.bincount(slots, minlength=per_day)[:, None]
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def profile_share(X: np.ndarray, slots: np.ndarray, profiles: np.ndarray) -> np.ndarray:
    """Per metric, the share of its variance held by its daily mean profile (`daily_profiles` over `slots`)."""
    total = X.var(axis=0)
    return np.where(total > 0, profiles[slots].var(axis=0) / np.where(total > 0, total, 1.0), np.nan)


def harmonic_shares(profiles: np.ndarray, harmonics: int = HARMONICS) -> np.ndarray:
    """(metrics, harmonics): cumulative share of each daily mean profile's power (its mean removed) in its first
    1 .. `harmonics` harmonics; slots nobody reported in take the profile's mean."""
    centred = np.where(np.isnan(profiles), np.nanmean(profiles, axis=0), profiles) - np.nanmean(profiles, axis=0)
    power = np.abs(np.fft.rfft(centred, axis=0)[1:]) ** 2
    total = power.sum(axis=0)
    shares = np.cumsum(power, axis=0) / np.where(total > 0, total, np.nan)
    return shares[np.minimum(np.arange(harmonics), len(shares) - 1)].T


def cycle_days(X: np.ndarray, per_day: int) -> float:
    """The period of `X`'s metrics in days of `per_day` readings: the lag of the first local peak of their mean
    autocorrelation, after it first falls below 0 and before a third of the series, that reaches
    `PERIOD_PEAK_SHARE` of the highest such peak; nan when there is none."""
    n = len(X)
    hi = n // 3
    Z = (X - X.mean(0)) / X.std(0)
    size = 1 << int(np.ceil(np.log2(2 * n)))
    spectrum = np.fft.rfft(Z, size, axis=0)
    acf = np.fft.irfft(np.abs(spectrum) ** 2, size, axis=0)[:hi + 1].mean(axis=1)
    acf = acf / acf[0] * n / (n - np.arange(hi + 1))   # unbiased, normalised to 1 at lag 0
    negative = np.flatnonzero(acf < 0)
    if negative.size == 0 or negative[0] >= hi - 2:
        return float("nan")
    inner = np.arange(negative[0] + 1, hi)
    peaks = inner[(acf[inner] >= acf[inner - 1]) & (acf[inner] >= acf[inner + 1])]
    if peaks.size == 0 or acf[peaks].max() <= 0:
        return float("nan")
    return float(peaks[np.argmax(acf[peaks] >= PERIOD_PEAK_SHARE * acf[peaks].max())] / per_day)


def device_row(X: np.ndarray, ts: np.ndarray, rng: np.random.Generator) -> dict:
    """The module docstring's figures for one device (its readings `X`, event times `ts`, row for row)."""
    per_day = readings_per_day(ts)
    X = moving(X)
    row: dict = {"readings": int(len(X)), "metrics_varying": int(X.shape[1]), "readings_per_day": per_day,
                 "days": round(len(X) / per_day, 2)}
    if X.shape[1] == 0:
        return row
    for days in LAGS_DAYS:
        row[f"acf_{days:g}d"] = _median([autocorrelation(x, int(round(days * per_day))) for x in X.T])
    slots = slots_of_day(ts, per_day)
    shuffled = rng.permutation(slots)
    profiles = daily_profiles(X, slots, per_day)
    row["profile_share"] = _median(profile_share(X, slots, profiles))
    row["profile_share_chance"] = _median(profile_share(X, shuffled, daily_profiles(X, shuffled, per_day)))
    shares = harmonic_shares(profiles)
    for k in range(1, HARMONICS + 1):
        row[f"harmonics_{k}"] = _median(shares[:, k - 1])
    row["cycle_days"] = _round(cycle_days(X, per_day))
    return row


def _median(values) -> float | None:
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return _round(float(np.median(values))) if values.size else None


def _round(value: float) -> float | None:
    return None if value is None or np.isnan(value) else round(float(value), 4)


COLUMNS = ("days", "acf_0.5d", "acf_1d", "acf_6d", "acf_7d", "acf_8d", "profile_share", "profile_share_chance",
           "harmonics_1", "harmonics_2", "harmonics_3", "harmonics_4", "cycle_days")


def main() -> int:
    parser = training_fleet_parser(__doc__, QUICK)
    args = parser.parse_args()
    stop_cleanly_on_sigterm()
    started = time.perf_counter()
    fleet, _, path, times = training_fleet(args.train, MIN_READINGS, "seasonality", QUICK if args.quick else None)
    rng = np.random.default_rng(SEED)
    rows = []
    print(f"{'device':<14}" + "".join(f"{c:>22}" if len(c) > 12 else f"{c:>13}" for c in COLUMNS))
    for device, X in fleet.items():
        try:
            row = {"device": device, **device_row(X, times[device], rng)}
        except ValueError as exc:
            row = {"device": device, "error": str(exc)}
        rows.append(row)
        print(f"{device:<14}" + "".join(_cell(row.get(c), 22 if len(c) > 12 else 13) for c in COLUMNS)
              + (f"  ({row['error']})" if "error" in row else ""))
    fleet_row = {c: _median([r[c] for r in rows if r.get(c) is not None]) for c in COLUMNS}
    print(f"{'fleet median':<14}" + "".join(_cell(fleet_row[c], 22 if len(c) > 12 else 13) for c in COLUMNS))
    share, chance = fleet_row["profile_share"], fleet_row["profile_share_chance"]
    if share is not None:
        print(f"\nthe daily profile holds {share:.0%} of a metric's variance (chance: {chance:.0%}); its first "
              f"harmonic {fleet_row['harmonics_1']:.0%} of the profile's power, harmonics 1-{HARMONICS} "
              f"{fleet_row['harmonics_4']:.0%}; the metrics' period: {fleet_row['cycle_days']} days of the "
              f"timestamps ({time.perf_counter() - started:.1f} s)")
    write_json(args.json, {
        "headline": {"name": "daily profile's share of a metric's variance (fleet median)",
                     "value": share, "unit": "share", "floor": chance},
        "rows": rows, "fleet": fleet_row, "train": str(path), "quick": args.quick,
        "seconds": round(time.perf_counter() - started, 2)})
    return 0


def _cell(value, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.3f}"


if __name__ == "__main__":
    sys.exit(main())
