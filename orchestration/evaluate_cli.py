"""`flead evaluate`: local vs federated vs centralized detectors and baselines on one labelled split.

The protocol is `models.evaluation`'s; this module only loads the data (`telemetry.datasets`), builds the
detector factory and the aggregation strategy from the configuration, prints progress and a table, and writes
the JSON report.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from config.arguments import non_negative, positive

TABLE_COLUMNS = ("roc_auc", "pr_auc", "f1", "precision", "recall", "best_f1", "incident_f1", "composite_f1",
                 "f1_pa")
QUICK = {"devices": 4, "train_rows": 3000, "test_rows": 3000, "rounds": 2}
# NAB series have one metric: the autoencoders then reconstruct a short recent window of it (lags, a rolling mean
# and deviation, the rate of change) instead of a single number; the subspace kind has its own window. A priori.
NAB_FEATURES = {"lags": [1, 2, 3], "rolling_windows": [6], "rate_of_change": True}
# NSL-KDD records are not a time series and its test split (57 % attacks) is a set, not the continuation of a
# device's stream: windows over neighbouring records mean nothing, and learning the test records would learn the
# attacks. It is evaluated in the batch protocol (learn the normal training records, then a frozen model) with
# windows of one record. Fixed a priori.
NSL_KDD_OVERRIDES = {"subspace_window": 1}
DEFAULT_PROTOCOL = {"nsl-kdd": "batch"}
POOLINGS = ("own", "rolling", "calibration")  # how devices are normalised before the fleet is pooled: pooling_options
POOLING = {"stream": "rolling", "batch": "calibration"}  # default per protocol (stream: docs/evaluation.md, item 11;
#                                                         a batch test split is a set, not the continuation of a stream)


def pooling_options(pooling: str, history: int) -> dict:
    """`models.evaluation.evaluate_fleet`'s options for one of `POOLINGS`. ``rolling``: every model's test scores as
    robust z against its last `history` scores (`rolling_robust_z`); ``own``: detectors that emit ``z_scores``
    (stream protocol) on those, computed against their threshold history (their recent scores without an
    incident's episode: what the stream job emits), the other models as ``rolling``; ``calibration``: against the
    calibration scores alone."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling: unknown {pooling!r} (known: {', '.join(POOLINGS)})")
    return {"pooling_window": 0 if pooling == "calibration" else int(history), "own_z": pooling == "own"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="compare local, federated and centralized detectors with baselines on labelled data",
        description="Train on the training split, score the test split, report ROC-AUC, PR-AUC, F1 at an operating "
                    "threshold chosen without test labels, best F1 (an upper bound) and point-adjusted F1.")
    p.add_argument("--dataset", choices=["asd", "nab", "nsl-kdd"],
                   help="a reference data set under paths.data_dir (default: asd unless --train/--test are given)")
    p.add_argument("--train", help="multi-entity CSV[.gz] for training: device_id,timestamp,<metrics...>[,label]")
    p.add_argument("--test", help="multi-entity CSV[.gz] for testing, with a label column")
    p.add_argument("--model", choices=["subspace", "ae", "lstm_ae"], help="per-device model (default: model.kind)")
    p.add_argument("--protocol", choices=["stream", "batch"],
                   help="stream (default; batch for nsl-kdd, whose records are no time series): every detector "
                        "scores then learns each reading once, in micro-batches of stream.micro_batch_size, with a "
                        "federated round every stream.snapshot_every readings, flags from its own online "
                        "threshold, as the stream job runs it; batch: epochs over the training part, then a frozen "
                        "model")
    p.add_argument("--rounds", type=positive(int), default=10,
                   help="batch protocol: federated rounds (local/centralized get as many epochs)")
    p.add_argument("--local-epochs", type=positive(int), default=1,
                   help="batch protocol: epochs over a device's data per round")
    p.add_argument("--finetune-epochs", type=non_negative(), default=0,
                   help="batch protocol: also report the federated model fine-tuned this many local epochs")
    p.add_argument("--clients", type=positive(int), default=20, help="nsl-kdd: number of client devices")
    p.add_argument("--non-iid", action="store_true", help="nsl-kdd: clients by service instead of at random")
    p.add_argument("--keep-train-attacks", action="store_true",
                   help="nsl-kdd: train on attacks too (default: normal training rows only, selected with the "
                        "TRAINING labels, the usual semi-supervised protocol)")
    p.add_argument("--models", default=",".join(("federated", "local", "centralized", "isolation_forest", "pca",
                                                  "dbscan", "random")),
                   help="comma-separated subset of the models to run")
    p.add_argument("--train-per-device", type=non_negative(), default=0, metavar="N",
                   help="use only the first N training rows of each device (0 = all; `flead demo` replays 2000 by "
                        "default: this reproduces its protocol offline)")
    p.add_argument("--pooling", choices=POOLINGS,
                   help=f"how each device's scores are normalised before the fleet is pooled (no labels; stream "
                        f"protocol default: {POOLING['stream']}): rolling: robust z against the device's last "
                        "threshold.history scores before each micro-batch, calibration scores first; own: the "
                        "detectors on the robust z they emit themselves (against those recent scores without an "
                        "incident's episode), the baselines as rolling; calibration (default in the batch protocol, "
                        "whose test split is a set, not a stream): against the calibration scores alone (a run's "
                        "JSON gives these too, under fixed_calibration, and own's gives rolling's, under all_recent)")
    p.add_argument("--seed", type=int, default=0, help="seed of the baselines and of the nsl-kdd client split")
    p.add_argument("--json", dest="json_out", help="write the report to this JSON file")
    p.add_argument("--plot", metavar="FILE.png",
                   help="draw the pooled ROC and precision-recall curves and the F1 figures of every model to this PNG")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK['devices']} devices, {QUICK['train_rows']} rows each, "
                        f"{QUICK['rounds']} rounds (not for reporting)")
    p.set_defaults(func=run_evaluate)


def _load(args, cfg, times: dict):
    """(dataset, train, test, metric names, facts); `times` is filled with each device's (training, test) event
    times where the data has them (not NSL-KDD's records)."""
    from telemetry import datasets
    data = cfg.data_dir
    if args.train or args.test:
        if not (args.train and args.test):
            raise SystemExit("flead evaluate: give both --train and --test")
        return (args.dataset or Path(args.train).resolve().parent.name,   # e.g. asd for asd/train.csv.gz
                *datasets.load_multi_entity(args.train, args.test, times=times), {})
    dataset = args.dataset or "asd"
    if dataset == "asd":
        return (dataset, *datasets.load_multi_entity(data / "asd" / "train.csv.gz", data / "asd" / "test.csv.gz",
                                                     times=times), {})
    if dataset == "nab":
        return (dataset, *datasets.load_nab(data / "nab", times=times),
                {"probation": "the first 15 % of each series trains"})
    train_normal_only = not args.keep_train_attacks
    train, test, names = datasets.load_nsl_kdd(data / "nsl-kdd" / "KDDTrain+_20Percent.txt",
                                               data / "nsl-kdd" / "KDDTest+.txt", clients=args.clients,
                                               non_iid=args.non_iid, seed=args.seed,
                                               train_normal_only=train_normal_only)
    test = {d: v for d, v in test.items() if d in train and len(train[d]) >= 10}
    train = {d: X for d, X in train.items() if d in test}
    return dataset, train, test, names, {"clients": args.clients, "non_iid": args.non_iid,
                                         "train_normal_only": train_normal_only}


def _shrink(train, test, times):
    devices = list(train)[:QUICK["devices"]]
    return ({d: train[d][:QUICK["train_rows"]] for d in devices},
            {d: (test[d][0][:QUICK["test_rows"]], test[d][1][:QUICK["test_rows"]]) for d in devices},
            {d: (times[d][0][:QUICK["train_rows"]], times[d][1][:QUICK["test_rows"]]) for d in devices if d in times})


def _nab_windows(y):
    from models.metrics import anomaly_segments
    return [(start, end - 1) for start, end in anomaly_segments(y)]


def _nab_scores(evaluation, test, cfg) -> dict:
    """NAB score (standard profile) per model: at the operating flags with one alert per incident, and with NAB's
    scoreboard protocol (one corpus-wide threshold on the scores, the one that maximises the NAB score: chosen
    with the labels, an upper bound like best F1)."""
    import numpy as np

    from models.metrics import NAB_STANDARD_PROFILE, flag_groups, nab_score, nab_score_optimised
    profiles = cfg.data_dir / "nab" / "profiles.json"
    profile = (json.loads(profiles.read_text())["standard"]["CostMatrix"] if profiles.is_file()
               else NAB_STANDARD_PROFILE)
    gap = cfg.incidents.gap_readings
    out = {}
    for name, flags in evaluation.flags.items():
        # Our test split starts after NAB's probationary 15 %, so nothing more is skipped. An operator is told
        # once per incident: its first flagged reading is the alert (1.0), the rest of it is not.
        alerts = []
        for d, device_flags in flags.items():
            first = np.zeros(len(device_flags))
            first[[start for start, _ in flag_groups(device_flags, gap)]] = 1.0
            alerts.append((first, _nab_windows(test[d][1])))
        # NAB's scoreboard sweeps one threshold over the detectors' own scores of every file: ours are
        # normalised residuals (about 1 on normal data on every device), the baselines' their raw scores.
        raw = [(evaluation.raw_scores[name][d], _nab_windows(test[d][1])) for d in flags]
        normalised = [(evaluation.scores[name][d], _nab_windows(test[d][1])) for d in flags]
        out[name] = {"operating": nab_score(alerts, 1.0, profile, probation_percent=0.0),
                     "optimised": nab_score_optimised(raw, profile, probation_percent=0.0),
                     "optimised_on_robust_z": nab_score_optimised(normalised, profile, probation_percent=0.0),
                     "alerts": int(sum(a.sum() for a, _ in alerts))}
    return out


def _without_nan(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _without_nan(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_without_nan(v) for v in value]
    return value


def format_table(report: dict) -> str:
    """The models × metrics table as GitHub markdown (also readable in a terminal)."""
    nab = report.get("nab_score")
    columns = list(TABLE_COLUMNS) + (["nab", "nab_opt"] if nab else [])
    lines = ["| model | " + " | ".join(columns) + " |", "| --- |" + " ---: |" * len(columns)]
    for name, m in report["models"].items():
        cells = [m.get(c) for c in TABLE_COLUMNS]
        if nab:
            cells += [nab[name]["operating"]["score"], nab[name]["optimised"]["score"]]
        lines.append(f"| {name} | " + " | ".join("n/a" if v is None or (isinstance(v, float) and math.isnan(v))
                                                  else f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}" for v in cells) + " |")
    return "\n".join(lines)


def _adoption(cfg) -> str:
    """How devices adopt global models (`stream.global_policy` and its parameter), for the plan line."""
    policy, adoption = cfg.stream.global_policy, cfg.model.adoption
    detail = {"blend": f"share {cfg.stream.blend_weight}", "prior": f"worth {adoption.prior_readings} readings",
              "validated": f"shares {adoption.candidates} on the last {adoption.validation_readings} readings"}
    return f"{policy} ({detail[policy]})" if policy in detail else policy


def run_evaluate(args, cfg) -> int:
    import numpy as np

    from models.aggregation import make_strategy
    from models.detector import DeviceDetector
    from models.evaluation import evaluate_fleet

    started = time.monotonic()

    def say(line: str) -> None:
        print(f"[{time.monotonic() - started:7.1f}s] {line}", flush=True)

    if args.train_per_device < 0:
        raise SystemExit("flead evaluate: --train-per-device must be 0 (all) or a positive number of rows")
    times: dict = {}
    dataset, train, test, names, facts = _load(args, cfg, times)
    if args.train_per_device:
        train = {d: X[:args.train_per_device] for d, X in train.items()}
        times = {d: (train_ts[:args.train_per_device], test_ts) for d, (train_ts, test_ts) in times.items()}
        facts = {**facts, "train_per_device": args.train_per_device}
    rounds = args.rounds
    if args.quick:
        train, test, times = _shrink(train, test, times)
        rounds = min(rounds, QUICK["rounds"])
    kind = args.model or cfg.model.kind
    protocol = args.protocol or DEFAULT_PROTOCOL.get(dataset, "stream")
    overrides = {"kind": kind, **(NAB_FEATURES if dataset == "nab" and kind != "subspace" else {}),
                 **(NSL_KDD_OVERRIDES if dataset == "nsl-kdd" else {})}
    if protocol == "batch":
        # The detector's own online threshold is not used there (the evaluation thresholds calibration scores):
        # the quantile rule is the cheapest to keep updated while training.
        overrides["threshold_kind"] = "quantile"
    if cfg.model.features.time_of_day and (protocol == "batch" or set(times) != set(train)):
        overrides["time_of_day"] = False   # records without event times, or a protocol that gives none
        facts = {**facts, "time_of_day": "off: this data or protocol has no event times"}
    plan = (f"batch protocol: {rounds} rounds x {args.local_epochs} epoch(s)" if protocol == "batch" else
            f"stream protocol: micro-batches of {cfg.stream.micro_batch_size}, a federated round every "
            f"{cfg.stream.snapshot_every} readings, adoption: {_adoption(cfg)}")
    say(f"{dataset}: {len(train)} devices, {sum(len(X) for X in train.values())} training and "
        f"{sum(len(X) for X, _ in test.values())} test rows, {len(names)} metrics; model {kind}, {plan}")
    threshold_cfg = {k: cfg.threshold[k] for k in ("kind", "target_false_alarm_rate", "sigma_k")}
    evaluation = evaluate_fleet(
        train, test, lambda: DeviceDetector.create(names, cfg, **overrides), rounds=rounds,
        local_epochs=args.local_epochs, strategy=make_strategy(cfg), finetune_epochs=args.finetune_epochs,
        threshold_cfg=threshold_cfg, seed=args.seed, progress=say, protocol=protocol,
        micro_batch=cfg.stream.micro_batch_size, round_every=cfg.stream.snapshot_every,
        incident_gap=cfg.incidents.gap_readings, models=[m.strip() for m in args.models.split(",") if m.strip()],
        times=times if protocol == "stream" and set(times) == set(train) else None,
        **pooling_options(args.pooling or POOLING[protocol], cfg.threshold.history))
    report = {"dataset": dataset, "model": kind, "metrics": names if len(names) <= 40 else len(names), **facts,
              **evaluation.report, "quick": args.quick, "seconds": round(time.monotonic() - started, 1)}
    if dataset == "nab":
        report["nab_score"] = _nab_scores(evaluation, test, cfg)
    print(format_table(report))
    for key, pooled_on in (("fixed_calibration", "the calibration scores alone (--pooling calibration)"),
                           ("all_recent", "all recent scores (--pooling rolling)")):
        other = {name: m[key] for name, m in report["models"].items() if key in m}
        if other:
            print(f"pooled on {pooled_on}, roc_auc / pr_auc / best_f1: "
                  + ", ".join(f"{name} {f['roc_auc']:.3f} / {f['pr_auc']:.3f} / {f['best_f1']:.3f}"
                              for name, f in other.items()))
    if args.json_out:
        out = Path(args.json_out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_without_nan(report), indent=1, default=lambda v: v.item()
                                  if isinstance(v, np.generic) else str(v)) + "\n")
        say(f"wrote {out}")
    if args.plot:
        from orchestration.evaluate_plot import plot_evaluation
        title = (f"flead evaluate: {dataset}, {report['devices']} devices, {report['test_rows']} test readings, "
                 f"{protocol} protocol, model {kind}")
        say(f"wrote {plot_evaluation(evaluation, {d: y for d, (_, y) in test.items()}, title, args.plot)}")
    return 0

