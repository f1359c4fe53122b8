"""`flead report`: one self-contained HTML (or Markdown) report of what the pipeline stored in MongoDB.

Sections: per-device score traces; precision/recall/F1 at the stream's own operating thresholds (no point
adjustment) with label-free-normalised ROC-AUC/PR-AUC; quality per global model version; throughput; incidents (the
strongest first); drift events; federated rounds; dead letters. Each collection is read once, with a projection
(FerretDB scans ~10k documents/s).
"""
from __future__ import annotations

import base64
import html
import io
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from config import Config
from config.arguments import non_negative
from models.evaluation import robust_normaliser
from models.metrics import anomaly_segments, average_precision, precision_recall_f1_from_predictions, roc_auc
from storage.mongo import Store

METRIC_FIELDS = ("model_version", "model", "scope", "device_id", "f1", "roc_auc", "pr_auc", "created_at")
ROUND_FIELDS = ("round_id", "version", "strategy", "participants", "n_participants", "rejected", "started_at",
                "duration_s")
ACCURACY_HEADERS = ["devices", "labelled points", "anomalous", "flagged", "precision", "recall", "F1",
                    "ROC-AUC", "PR-AUC"]
NICE_BUCKET_SECONDS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400)
THROUGHPUT_BUCKETS = 120  # about this many buckets over the whole run
LOG_SCALE_SPREAD = 50  # plot scores on a log axis when the largest is this many times the median
SHOWN_PARTICIPANTS = 8
SHOWN_INCIDENTS = 20  # the incidents section lists this many, the highest peak over threshold first
INCIDENT_FIELDS = ("device_id", "status", "start_ts", "end_ts", "n_flagged", "peak_score", "peak_ratio",
                   "metrics_to_blame")
DRIFT_FIELDS = ("device_id", "seq", "ts", "reason", "flag_rate", "target_rate", "window")
CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
       "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
       "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f2f2f2}"
       "figure{margin:0 0 1.5em}img{max-width:100%}figcaption{color:#555;font-size:90%}")


def register(sub) -> None:
    p = sub.add_parser("report", help="write an HTML report of the stored scores, accuracy, incidents, drift "
                                      "events, rounds and dead letters")
    p.add_argument("--out", default=None, help="output file (default: <state_dir>/report/report.html, or .md)")
    p.add_argument("--devices", type=non_negative(), default=6,
                   help="plot the score traces of up to N devices (default 6)")
    p.add_argument("--format", choices=("html", "md"), default="html",
                   help="html: one self-contained file (default); md: Markdown with the PNG files beside it")
    p.set_defaults(func=cmd_report)


# --- what the report is made of ---------------------------------------------------------------------------

@dataclass
class Table:
    headers: list[str]
    rows: list[list]


@dataclass
class Figure:
    name: str  # file stem of the PNG in Markdown output
    png: bytes
    caption: str


Section = tuple[str, list]  # heading, blocks: paragraphs (str), Table, Figure


def cell_text(value) -> str:
    """Numbers as the report prints them: floats to 3 decimals, missing or undefined as a dash."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, (float, np.floating)):
        return f"{value:.3f}"
    return str(value)


def utc(ms) -> str:
    return "–" if ms is None else datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def mean_or_nan(values) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


# --- the stored scores ------------------------------------------------------------------------------------

@dataclass
class Predictions:
    """The stored score records as columns, sorted by device then event time."""

    device_id: np.ndarray
    ts: np.ndarray
    score: np.ndarray
    threshold: np.ndarray
    is_anomaly: np.ndarray
    label: np.ndarray           # 1, 0, or -1 where the reading carried no label
    global_version: np.ndarray
    scored_at: np.ndarray       # epoch ms, NaN where missing
    normalised: np.ndarray      # each score as a robust z-score among its own device's scores
    rows_of: dict               # device → slice of its rows

    @property
    def labelled(self) -> np.ndarray:
        return self.label >= 0


def load_predictions(store: Store) -> Predictions:
    """Every stored score record's fields this report needs, in one pass over the `predictions` buckets."""
    cols = store.score_columns()
    device = cols["device_id"].astype(str)
    ts, score = cols["ts"], cols["score"]
    order = np.lexsort((ts, device))
    device, ts, score = device[order], ts[order], score[order]
    names, starts, counts = np.unique(device, return_index=True, return_counts=True)
    rows_of = {str(d): slice(int(s), int(s + n)) for d, s, n in zip(names, starts, counts)}
    normalised = np.empty_like(score)
    for rows in rows_of.values():
        normalised[rows] = robust_normaliser(score[rows])(score[rows])
    scored_at = cols["scored_at"].astype(np.float64)[order]
    scored_at[scored_at == 0] = math.nan  # records without scored_at
    return Predictions(
        device_id=device, ts=ts, score=score, threshold=cols["threshold"][order],
        is_anomaly=cols["is_anomaly"].astype(bool)[order], label=cols["label"][order],
        global_version=cols["global_version"][order], scored_at=scored_at, normalised=normalised, rows_of=rows_of)


def accuracy_row(name: str, p: Predictions, rows, scores: np.ndarray) -> list:
    """One `ACCURACY_HEADERS` row over the labelled points among `rows`; AUCs of `scores`."""
    mask = np.zeros(len(p.label), dtype=bool)
    mask[rows] = True
    mask &= p.labelled
    y, flagged = p.label[mask], p.is_anomaly[mask]
    precision, recall, f1 = precision_recall_f1_from_predictions(y, flagged) if mask.any() else (math.nan,) * 3
    return [name, int(mask.sum()), int(y.sum()), int(flagged.sum()), precision, recall, f1,
            roc_auc(y, scores[mask]), average_precision(y, scores[mask])]


# --- the sections -----------------------------------------------------------------------------------------

def trace_section(p: Predictions, n_devices: int) -> Section:
    """Score and threshold over event time of the devices with the most labelled anomalies, then alerts."""
    heading = "Score traces"
    if not p.rows_of or n_devices <= 0:
        return heading, ["No score records in `predictions`." if not p.rows_of else "No devices requested."]
    ranked = sorted(p.rows_of, key=lambda d: (-int((p.label[p.rows_of[d]] == 1).sum()),
                                              -int(p.is_anomaly[p.rows_of[d]].sum()), d))
    devices = ranked[:n_devices]
    caption = (f"{len(devices)} of {len(p.rows_of)} devices (most labelled anomalies first): score (blue), operating "
               "threshold (orange), flagged readings (red dots), labelled anomalous readings (red band).")
    return heading, [Figure("traces", trace_figure(p, devices), caption)]


def trace_figure(p: Predictions, devices: list[str]) -> bytes:
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(len(devices), 1, figsize=(11, 2.4 * len(devices)), squeeze=False)
    for ax, device in zip(axes[:, 0], devices):
        rows = p.rows_of[device]
        t = p.ts[rows].astype("datetime64[ms]")
        score, threshold, flagged = p.score[rows], p.threshold[rows], p.is_anomaly[rows]
        labels = (p.label[rows] == 1).astype(int)
        half_step = np.timedelta64(int(np.median(np.diff(p.ts[rows])) / 2) if len(t) > 1 else 0, "ms")
        for start, end in anomaly_segments(labels):
            ax.axvspan(t[start] - half_step, t[end - 1] + half_step, color="tab:red", alpha=0.15, lw=0)
        ax.plot(t, score, lw=0.7, color="tab:blue", label="score")
        ax.plot(t, threshold, lw=1.2, color="tab:orange", drawstyle="steps-post", label="threshold")
        ax.scatter(t[flagged], score[flagged], s=9, color="tab:red", zorder=3, label="flagged")
        if score.min() > 0 and threshold.min() > 0 and score.max() > LOG_SCALE_SPREAD * np.median(score):
            ax.set_yscale("log")
        ax.set_title(f"{device}: {len(t):,} readings, {int(flagged.sum())} flagged, "
                     f"{int(labels.sum())} labelled anomalous", loc="left", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.margins(x=0.01)
    handles, names = axes[0, 0].get_legend_handles_labels()
    axes[0, 0].legend(handles + [Patch(color="tab:red", alpha=0.15)], names + ["labelled anomalous"],
                      loc="upper left", ncol=4, fontsize=8)
    axes[-1, 0].set_xlabel("event time (UTC)")
    return png_of(fig)


def accuracy_section(p: Predictions) -> Section:
    """Precision/recall/F1 of the stream's own decisions, overall and per device, and AUCs of the raw score."""
    heading = "Accuracy against labels"
    if not p.labelled.any():
        return heading, ["No labelled score records: nothing to compare the alerts with."]
    per_device = [accuracy_row(d, p, rows, p.score) for d, rows in p.rows_of.items() if p.labelled[rows].any()]
    overall = accuracy_row("all devices", p, slice(None), p.normalised)
    mean = ["mean over devices", "", "", ""] + [mean_or_nan(column) for column in list(zip(*per_device))[4:]]
    return heading, [
        "Precision, recall and F1 count each labelled reading once, flagged or not by the stream at its own "
        "operating threshold (chosen online without labels); no point adjustment. ROC-AUC and PR-AUC rank the raw "
        "score: per device as stored, and pooled over the fleet after each device's scores are put on a common "
        "scale by their own median and MAD (robust z-score, no labels used). Devices with a single class have no AUC.",
        Table(ACCURACY_HEADERS, [overall, mean] + per_device)]


def versions_section(p: Predictions, metric_docs: list[dict]) -> Section:
    """Quality per global model: the evaluation job's `metrics`, and the scores tagged with each version."""
    blocks: list = []
    if metric_docs:
        groups = defaultdict(list)
        for doc in metric_docs:
            groups[(doc.get("model_version"), doc.get("model") or "–", doc.get("scope"))].append(doc)
        rows = []
        for (version, model, scope), docs in sorted(groups.items(), key=lambda g: (g[0][0] is None, g[0][0] or 0,
                                                                                   g[0][1], g[0][2])):
            rows.append([version, model, scope, len(docs)]
                        + [mean_or_nan(d.get(k) for d in docs) for k in ("f1", "roc_auc", "pr_auc")]
                        + [utc(max(d["created_at"] for d in docs))])
        blocks += ["From the evaluation job (`metrics`; device scope: mean over the devices evaluated):",
                   Table(["model version", "model", "scope", "documents", "F1", "ROC-AUC", "PR-AUC", "evaluated at"],
                         rows)]
    else:
        blocks.append("The `metrics` collection is empty: no model evaluation has been stored yet.")
    versions = np.unique(p.global_version)
    if p.labelled.any():
        rows = []
        for version in versions:
            in_version = p.global_version == version
            rows.append([f"v{version}" if version else "none (local only)", int(in_version.sum())]
                        + accuracy_row("", p, in_version, p.normalised)[1:])
        blocks += ["From the stream's scores, by the global model version each score was made with (versions "
                   "cover different stretches of time, so they are not a like-for-like comparison; AUCs pooled "
                   "over robust-z-normalised scores):",
                   Table(["global version", "scores"] + ACCURACY_HEADERS[1:], rows)]
    elif len(versions):
        blocks.append("Scores by global version: " + ", ".join(
            f"v{v}: {int((p.global_version == v).sum()):,}" for v in versions) + " (no labels to score them).")
    return "Quality per global model version", blocks


def throughput_section(p: Predictions) -> Section:
    """Scores stored per second of processing time (`scored_at`), in buckets of a round length."""
    heading = "Throughput"
    seconds = p.scored_at[np.isfinite(p.scored_at)] / 1000.0
    if not len(seconds):
        return heading, ["No score record carries `scored_at`."]
    first, span = seconds.min(), seconds.max() - seconds.min()
    bucket = next((b for b in NICE_BUCKET_SECONDS if b >= span / THROUGHPUT_BUCKETS), NICE_BUCKET_SECONDS[-1])
    start = first // bucket * bucket
    edges = start + bucket * np.arange(int((seconds.max() - start) // bucket) + 2)
    rate = np.histogram(seconds, edges)[0] / bucket
    text = (f"{len(seconds):,} scores from {utc(first * 1000)} to {utc(seconds.max() * 1000)} UTC: "
            f"{len(seconds) / span if span else math.nan:.1f} scores/s on average, up to {rate.max():.1f} scores/s "
            f"in a {bucket} s bucket (the first and last buckets are partial).")
    return heading, [text, Figure("throughput", throughput_figure(edges, rate, bucket),
                                  f"Scores per second of processing time, in {bucket} s buckets.")]


def throughput_figure(edges: np.ndarray, rate: np.ndarray, bucket: int) -> bytes:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 3))
    t = (edges * 1000).astype(np.int64).astype("datetime64[ms]")
    ax.fill_between(t, np.r_[rate, rate[-1]], step="post", color="tab:blue", alpha=0.35, lw=0)
    ax.step(t, np.r_[rate, rate[-1]], where="post", color="tab:blue", lw=1)
    ax.set_ylabel(f"scores/s ({bucket} s buckets)")
    ax.set_xlabel("scored at (UTC)")
    ax.set_ylim(bottom=0)
    ax.margins(x=0.01)
    return png_of(fig)


def blamed(metrics: list[dict] | None) -> str:
    """Metrics to blame with their share of the error, as the dashboards print them (``m01 66%, m04 5%``)."""
    return ", ".join(f"{m['metric']} {m['share']:.0%}" for m in metrics or []) or "–"


def incidents_section(incidents: list[dict]) -> Section:
    """How many incidents, on how many devices, how many still open; the strongest (peak over threshold) first."""
    heading = "Incidents"
    if not incidents:
        return heading, ["No incidents in `incidents` yet."]

    def strength(doc: dict) -> float:
        return doc["peak_ratio"] if doc.get("peak_ratio") is not None else -math.inf

    shown = sorted(incidents, key=strength, reverse=True)[:SHOWN_INCIDENTS]
    rows = [[d["device_id"], utc(d["start_ts"]), utc(d["end_ts"]), f"{(d['end_ts'] - d['start_ts']) / 60_000:.0f}",
             d["n_flagged"], d.get("peak_ratio"), blamed(d.get("metrics_to_blame")), d["status"]] for d in shown]
    open_now = sum(d["status"] == "open" for d in incidents)
    devices = len({d["device_id"] for d in incidents})
    return heading, [f"{len(incidents):,} incident(s) on {devices} device(s), {open_now} open; the {len(shown)} with "
                     "the highest peak over their device's threshold:",
                     Table(["device", "start (UTC)", "end (UTC)", "minutes", "flagged readings", "peak / threshold",
                            "metrics to blame (share of error)", "status"], rows)]


def drift_section(events: list[dict]) -> Section:
    """Each drift event (a device whose flag rate stayed far above its target, re-baselined), newest first."""
    heading = "Drift events"
    if not events:
        return heading, ["No drift events: no device's flag rate stayed far above its target."]
    rows = [[d["device_id"], utc(d["ts"]), d["seq"], d.get("flag_rate"), d.get("target_rate"), d.get("window"),
             d["reason"]] for d in sorted(events, key=lambda d: d["ts"], reverse=True)]
    devices = len({d["device_id"] for d in events})
    return heading, [f"{len(events):,} drift event(s) on {devices} device(s); each device re-baselined there.",
                     Table(["device", "time (UTC)", "seq", "flag rate", "target rate", "window (readings)",
                            "reason"], rows)]


def rounds_section(rounds: list[dict]) -> Section:
    """One row per aggregation round: who took part, who was rejected and why."""
    heading = "Federated rounds"
    if not rounds:
        return heading, ["No aggregation round in `aggregation_history` yet."]
    rows = []
    for r in sorted(rounds, key=lambda r: r["started_at"]):
        participants = r.get("participants") or []
        shown = ", ".join(participants[:SHOWN_PARTICIPANTS])
        if len(participants) > SHOWN_PARTICIPANTS:
            shown += f" (+{len(participants) - SHOWN_PARTICIPANTS} more)"
        rejected = "; ".join(f"{x['device_id']}: {x['reason']}" for x in r.get("rejected") or []) or "none"
        rows.append([r["round_id"], r.get("version"), r["strategy"], utc(r["started_at"]), r.get("duration_s"),
                     r.get("n_participants", len(participants)), shown, rejected])
    return heading, [f"{len(rounds)} round(s).", Table(
        ["round", "global version", "strategy", "started (UTC)", "seconds", "participants", "who", "rejected"], rows)]


def dead_letter_section(letters: list[dict]) -> Section:
    """Dead letters counted by reason, with when each reason was first and last seen."""
    heading = "Dead letters"
    if not letters:
        return heading, ["No dead letters."]
    counts = Counter(d["reason"] for d in letters)
    seen: dict[str, list] = defaultdict(list)
    for d in letters:
        seen[d["reason"]].append(d["at"])
    rows = [[reason, n, utc(min(seen[reason])), utc(max(seen[reason]))] for reason, n in counts.most_common()]
    return heading, [f"{len(letters):,} dead letter(s), {len(counts)} reason(s).",
                     Table(["reason", "count", "first (UTC)", "last (UTC)"], rows)]


def png_of(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def build_sections(store: Store, n_devices: int) -> list[Section]:
    """Read each collection once and turn it into the report's sections."""
    import matplotlib

    matplotlib.use("Agg")

    def read(key: str, fields) -> list[dict]:
        return store.find(key, None, fields, batch_size=10_000)

    p = load_predictions(store)
    return [trace_section(p, n_devices), accuracy_section(p), versions_section(p, read("metrics", METRIC_FIELDS)),
            throughput_section(p), incidents_section(read("incidents", INCIDENT_FIELDS)),
            drift_section(read("drift_events", DRIFT_FIELDS)),
            rounds_section(read("aggregation_history", ROUND_FIELDS)),
            dead_letter_section(read("dead_letters", ("reason", "at")))]


# --- writing ----------------------------------------------------------------------------------------------

def render_html(title: str, intro: str, sections: list[Section]) -> str:
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
             f"<style>{CSS}</style></head><body><h1>{esc(title)}</h1><p>{esc(intro)}</p>"]
    for heading, blocks in sections:
        parts.append(f"<h2>{esc(heading)}</h2>")
        for block in blocks:
            if isinstance(block, Table):
                head = "".join(f"<th>{esc(h)}</th>" for h in block.headers)
                body = "".join("<tr>" + "".join(f"<td>{esc(cell_text(c))}</td>" for c in row) + "</tr>"
                               for row in block.rows)
                parts.append(f"<table><tr>{head}</tr>{body}</table>")
            elif isinstance(block, Figure):
                data = base64.b64encode(block.png).decode()
                parts.append(f"<figure><img alt='{esc(block.name)}' src='data:image/png;base64,{data}'>"
                             f"<figcaption>{esc(block.caption)}</figcaption></figure>")
            else:
                parts.append(f"<p>{esc(block)}</p>")
    return "\n".join(parts) + "\n</body></html>\n"


def render_markdown(title: str, intro: str, sections: list[Section], out: Path) -> str:
    """Markdown text; each figure is written beside `out` as `<stem>-<figure>.png`."""
    lines = [f"# {title}", "", intro, ""]
    for heading, blocks in sections:
        lines += [f"## {heading}", ""]
        for block in blocks:
            if isinstance(block, Table):
                lines.append("| " + " | ".join(block.headers) + " |")
                lines.append("|" + "---|" * len(block.headers))
                lines += ["| " + " | ".join(cell_text(c).replace("|", "\\|") for c in row) + " |"
                          for row in block.rows]
            elif isinstance(block, Figure):
                png = out.with_name(f"{out.stem}-{block.name}.png")
                png.write_bytes(block.png)
                lines += [f"![{block.name}]({png.name})", "", f"*{block.caption}*"]
            else:
                lines.append(block)
            lines.append("")
    return "\n".join(lines)


def write_report(store: Store, out: Path, n_devices: int = 6, fmt: str = "html") -> Path:
    """Write the report of everything in `store` to `out` (HTML, or Markdown with PNGs beside it)."""
    sections = build_sections(store, n_devices)
    title = "FLEAD report"
    now_ms = datetime.now(timezone.utc).timestamp() * 1000
    intro = f"Database {store.name} at {store.cfg.mongo_uri_redacted}, generated {utc(now_ms)} UTC."
    out.parent.mkdir(parents=True, exist_ok=True)
    text = render_html(title, intro, sections) if fmt == "html" else render_markdown(title, intro, sections, out)
    out.write_text(text, encoding="utf-8")
    return out


def cmd_report(args, cfg: Config) -> int:
    out = Path(args.out) if args.out else cfg.state_dir / "report" / f"report.{args.format}"
    with Store(cfg) as store:
        print(f"reading {store.name} ...", flush=True)
        print(f"report written to {write_report(store, out, args.devices, args.format)}")
    return 0
