"""`flead produce` (replay a data set into the telemetry topic) and `flead consume` (read any project topic)."""
from __future__ import annotations

import json
import sys

from config.arguments import non_negative, positive

FORMAT_HELP = ("asd | csv: device_id,timestamp,<metrics...>[,label] (gzip or plain); nab: a NAB folder or file; "
               "nsl-kdd: KDD records split into clients; intel-lab: Intel Berkeley Lab log; "
               "netload: timeslot,hostname,ifname,max_metric_value,mean_metric_value")
# What `--path` defaults to per format, relative to `paths.data_dir` or (samples) to the telemetry package.
DEFAULT_PATHS = {
    "asd": ("data", "asd/test.csv.gz"),
    "nab": ("data", "nab"),
    "nsl-kdd": ("data", "nsl-kdd/KDDTest+.txt"),
    "intel-lab": ("samples", "synthetic_intel_lab.txt"),
    "netload": ("samples", "synthetic_netload.csv"),
}


def register(subparsers) -> None:
    p = subparsers.add_parser("produce", help="replay a data set into the telemetry topic",
                              description="Replay readings into kafka.topics.telemetry (key = device_id), each message "
                                          "signed with its device's token (derived from integrity.key).")
    p.add_argument("--format", required=True, choices=["asd", "csv", "nab", "nsl-kdd", "intel-lab", "netload"],
                   help=FORMAT_HELP)
    p.add_argument("--path", help="input file or folder (default: the reference data or synthetic sample of the format)")
    pace = p.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=positive(), help="readings per second (default: as fast as possible)")
    pace.add_argument("--speedup", type=positive(), help="replay event time this many times faster than real time")
    p.add_argument("--order", choices=["file", "time"], default="file",
                   help="file: as stored (streams, little memory); time: all devices interleaved by event time "
                        "(loads the data set into memory)")
    p.add_argument("--loop", action="store_true", help="repeat forever (seq and ts keep increasing)")
    p.add_argument("--start", type=non_negative(), default=0, help="skip this many readings first")
    p.add_argument("--limit", type=non_negative(), help="stop after this many readings")
    p.add_argument("--batch", type=positive(int), help="readings per message, one device each (default: ingest.batch)")
    p.add_argument("--skip-bad", action="store_true", help="skip unparseable rows (counted) instead of failing")
    p.add_argument("--clients", type=positive(int), default=10, help="nsl-kdd: number of client devices")
    p.add_argument("--non-iid", action="store_true", help="nsl-kdd: clients by service instead of at random")
    p.add_argument("--seed", type=int, default=0, help="nsl-kdd: random split seed")
    p.set_defaults(func=run_produce)

    c = subparsers.add_parser("consume", help="tail, count or pretty-print a project topic",
                              description="Read a topic: a key of kafka.topics (telemetry, scores, alerts, "
                                          "snapshots, global_model, dead_letters) or a full topic name.")
    c.add_argument("topic")
    c.add_argument("--from-beginning", action="store_true", help="read the topic from its start, not only new messages")
    c.add_argument("--count", action="store_true", help="only count messages (and telemetry readings)")
    c.add_argument("--max", type=positive(int), help="stop after N messages")
    c.add_argument("--timeout", type=positive(), help="stop after this many seconds without a message")
    c.add_argument("--json", action="store_true", help="print each message value as raw JSON, one per line")
    c.set_defaults(func=run_consume)


def _default_path(cfg, fmt: str) -> str:
    from telemetry.synthetic import SAMPLES_DIR

    if fmt not in DEFAULT_PATHS:
        raise SystemExit(f"flead produce: --path is required for --format {fmt}")
    base, relative = DEFAULT_PATHS[fmt]
    return str((cfg.data_dir if base == "data" else SAMPLES_DIR) / relative)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def run_produce(args, cfg) -> int:
    from models.integrity import signing_key
    from telemetry.producer import order_by_time, produce, producer_config
    from telemetry.readers import ReaderError, open_reader

    path = args.path or _default_path(cfg, args.format)
    options = ({"clients": args.clients, "non_iid": args.non_iid, "seed": args.seed}
               if args.format == "nsl-kdd" else {})
    batch = args.batch or cfg.ingest.batch
    topic = cfg.kafka.topics.telemetry
    try:
        reader = open_reader(args.format, path, skip_bad=args.skip_bad, **options)
        readings = order_by_time(reader) if args.order == "time" else reader
        _say(f"producing {args.format} from {path} to {topic} on {cfg.kafka_bootstrap} (batch {batch})")
        result = produce(readings, topic, producer_config(cfg), key=signing_key(cfg), batch=batch, rate=args.rate,
                         speedup=args.speedup, loop=args.loop, start=args.start, limit=args.limit,
                         max_batch_delay_s=cfg.ingest.max_batch_delay_ms / 1000,
                         progress=_say, progress_interval_s=cfg.ingest.progress_interval_s)
    except (ReaderError, OSError, ValueError) as exc:  # OSError includes ConnectionError
        print(f"flead produce: {exc}", file=sys.stderr)
        return 2
    if reader.stats.skipped:
        _say(f"skipped {reader.stats.skipped} bad rows (last pass); first: {reader.stats.errors[0]}")
    for error in result.errors:
        _say(f"delivery error: {error}")
    return 1 if result.failed else (130 if result.interrupted else 0)


def run_consume(args, cfg) -> int:
    from telemetry.consumer import consume

    counts = consume(cfg, args.topic, from_beginning=args.from_beginning, count_only=args.count,
                     max_messages=args.max, timeout_s=args.timeout, raw_json=args.json)
    if args.count:
        print(json.dumps(counts))
    else:
        print(f"{counts['messages']:,} messages from {counts['topic']}", file=sys.stderr)
    return 0

