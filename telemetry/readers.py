"""Readers of every input format, each yielding `Reading`s: ``ts`` in epoch ms (UTC), ``seq`` per device from 0.

One class per format, generic over a user's own files of the same shape:

- `MultiEntityCsvReader`: ``device_id,timestamp,<metrics...>[,label]`` (ASD and exported metric tables), gzip or plain.
- `NabReader`: a NAB folder (one device per ``timestamp,value`` CSV), labels from ``labels/combined_windows.json``.
- `NslKddReader`: NSL-KDD records split into federated clients.
- `IntelLabReader`: the Intel Berkeley Research Lab log (``date time epoch moteid temperature humidity light voltage``).
- `NetLoadReader`: network device load export (``timeslot,hostname,ifname,max_metric_value,mean_metric_value``).

A reader is re-iterable: each pass re-opens its files and counts again in ``reader.stats``. A row that cannot be
parsed raises `ReaderError` naming file and line, or, with ``skip_bad=True``, is skipped and counted.
Timestamps without a zone are taken as UTC; a purely numeric timestamp is epoch seconds (or ms if > 1e11).
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import math
import random
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

from telemetry.schema import Reading

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_ONE_MS = timedelta(milliseconds=1)
# Values above this are epoch milliseconds, below it epoch seconds (1e11 s is the year 5138).
EPOCH_MS_THRESHOLD = 1e11
MAX_KEPT_ERRORS = 10


class ReaderError(ValueError):
    """A row (or header) that cannot be read; the message names file and line."""

    def __init__(self, path: Path | str, line: int, reason: str):
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = str(path), line, reason


@dataclass
class ReaderStats:
    """Counts of the last pass: data rows seen, readings yielded, rows skipped (with the first few reasons)."""

    rows: int = 0
    readings: int = 0
    skipped: int = 0
    errors: list[str] = field(default_factory=list)


def parse_timestamp(text: str) -> int:
    """Epoch milliseconds (UTC) of an ISO 8601 date-time (naive = UTC) or a numeric epoch (s, or ms if > 1e11).

    >>> parse_timestamp("2024-01-31T00:05:00Z"), parse_timestamp("2024-01-31 00:05:00"), parse_timestamp("1706659500")
    (1706659500000, 1706659500000, 1706659500000)
    """
    text = text.strip()
    try:
        number = float(text)
    except ValueError:
        dt = datetime.fromisoformat(text)
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return (dt - EPOCH) // _ONE_MS
    if not math.isfinite(number):
        raise ValueError(f"not a timestamp: {text!r}")
    return int(number) if abs(number) > EPOCH_MS_THRESHOLD else int(round(number * 1000))


def parse_value(text: str) -> float:
    """A metric value; an empty cell or ``nan`` is missing (nan)."""
    return float(text) if text.strip() else math.nan


def parse_label(text: str) -> int | None:
    """A 0/1 label (``1.0`` accepted); an empty cell is no label."""
    if not text.strip():
        return None
    label = float(text)
    if label not in (0.0, 1.0):
        raise ValueError(f"label must be 0 or 1, got {text!r}")
    return int(label)


def open_text(path: Path | str) -> io.TextIOBase:
    """A text file, gunzipped on the fly when it starts with the gzip magic bytes."""
    path = Path(path)
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    if gzipped:
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


class Reader:
    """Base of the readers: per-device seq numbering, bad-row policy and stats. Subclasses implement `_rows`."""

    format = ""

    def __init__(self, skip_bad: bool = False):
        self.skip_bad = skip_bad
        self.stats = ReaderStats()
        self._next_seq: dict[str, int] = {}

    @property
    def metric_names(self) -> list[str]:
        """Names of the metrics every reading carries, in column order."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[Reading]:
        self.stats = ReaderStats()
        self._next_seq = {}
        for reading in self._rows():
            self.stats.readings += 1
            yield reading

    def _rows(self) -> Iterator[Reading]:
        raise NotImplementedError

    def _reading(self, device_id: str, ts: int, metrics: dict[str, float], label: int | None = None) -> Reading:
        seq = self._next_seq.get(device_id, 0)
        self._next_seq[device_id] = seq + 1
        return Reading(device_id, seq, ts, metrics, label)

    def _bad_row(self, path: Path, line: int, reason: str) -> None:
        """Skip and count the row when ``skip_bad``, else raise `ReaderError`."""
        error = ReaderError(path, line, reason)
        if not self.skip_bad:
            raise error
        self.stats.skipped += 1
        if len(self.stats.errors) < MAX_KEPT_ERRORS:
            self.stats.errors.append(str(error))


class MultiEntityCsvReader(Reader):
    """``device_id,timestamp,<metric columns...>[,label]`` with a header row; gzip or plain; any number of devices.

    Metric values are read as they are (no range assumed); an empty cell is missing (nan).
    """

    format = "csv"

    def __init__(self, path: Path | str, skip_bad: bool = False):
        super().__init__(skip_bad)
        self.path = Path(path)
        self._header: list[str] | None = None

    @property
    def header(self) -> list[str]:
        if self._header is None:
            with open_text(self.path) as f:
                self._header = self._check_header(next(csv.reader(f), []))
        return self._header

    def _check_header(self, header: list[str]) -> list[str]:
        header = [name.strip() for name in header]
        if header[:2] != ["device_id", "timestamp"] or len(header) < 3 or header[2:] == ["label"]:
            raise ReaderError(self.path, 1, "header must be device_id,timestamp,<metric columns...>[,label], "
                                            f"got {','.join(header)[:200]!r}")
        return header

    @property
    def metric_names(self) -> list[str]:
        return self.header[2:-1] if self.header[-1] == "label" else self.header[2:]

    def _rows(self) -> Iterator[Reading]:
        names = self.metric_names
        has_label = self.header[-1] == "label"
        width = len(self.header)
        with open_text(self.path) as f:
            rows = csv.reader(f)
            self._check_header(next(rows, []))
            for line, row in enumerate(rows, start=2):
                if not row:
                    continue
                self.stats.rows += 1
                if len(row) != width:
                    self._bad_row(self.path, line, f"expected {width} columns, got {len(row)}")
                    continue
                try:
                    ts = parse_timestamp(row[1])
                    metrics = {name: parse_value(text) for name, text in zip(names, row[2:])}
                    label = parse_label(row[-1]) if has_label else None
                except ValueError as exc:
                    self._bad_row(self.path, line, str(exc))
                    continue
                if not row[0]:
                    self._bad_row(self.path, line, "empty device_id")
                    continue
                yield self._reading(row[0], ts, metrics, label)


class NabReader(Reader):
    """A NAB folder (or one NAB file): each ``timestamp,value`` CSV is one device with the metric ``value``.

    The device id is the file's path relative to ``path`` without ``.csv`` (``realKnownCause/nyc_taxi``).
    Labels: 1 inside an anomaly window of ``labels/combined_windows.json`` (found in ``path`` or up to two
    folders above it, or given as ``windows_file``), else 0; files the windows file does not list get no label.
    """

    format = "nab"
    metric_names = ["value"]

    def __init__(self, path: Path | str, windows_file: Path | str | None = None, skip_bad: bool = False):
        super().__init__(skip_bad)
        self.path = Path(path)
        self.windows_file = Path(windows_file) if windows_file else self._find_windows_file()
        self._windows: dict[str, list[tuple[int, int]]] | None = None

    def _find_windows_file(self) -> Path | None:
        folder = self.path if self.path.is_dir() else self.path.parent
        for candidate in [folder, *list(folder.parents)[:2]]:
            windows = candidate / "labels" / "combined_windows.json"
            if windows.is_file():
                return windows
        return None

    @property
    def files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        return sorted(p for p in self.path.rglob("*.csv") if "labels" not in p.relative_to(self.path).parts)

    def device_id(self, file: Path) -> str:
        if self.path.is_file():
            return file.stem
        return file.relative_to(self.path).with_suffix("").as_posix()

    def windows(self, file: Path) -> list[tuple[int, int]] | None:
        """Anomaly windows of one file as (start, end) epoch ms, inclusive; None when it is not labelled."""
        if self.windows_file is None:
            return None
        if self._windows is None:
            with open(self.windows_file, encoding="utf-8") as f:
                raw = json.load(f)
            self._windows = {key: [(parse_timestamp(a), parse_timestamp(b)) for a, b in spans]
                             for key, spans in raw.items()}
        key = file.resolve().relative_to(self.windows_file.resolve().parent.parent).as_posix()
        return self._windows.get(key)

    def _rows(self) -> Iterator[Reading]:
        for file in self.files:
            device_id, windows = self.device_id(file), self.windows(file)
            with open_text(file) as f:
                rows = csv.reader(f)
                header = [name.strip() for name in next(rows, [])]
                if header != ["timestamp", "value"]:
                    raise ReaderError(file, 1, f"header must be timestamp,value, got {','.join(header)[:200]!r}")
                for line, row in enumerate(rows, start=2):
                    if not row:
                        continue
                    self.stats.rows += 1
                    try:
                        if len(row) != 2:
                            raise ValueError(f"expected 2 columns, got {len(row)}")
                        ts, value = parse_timestamp(row[0]), parse_value(row[1])
                    except ValueError as exc:
                        self._bad_row(file, line, str(exc))
                        continue
                    label = None if windows is None else int(any(a <= ts <= b for a, b in windows))
                    yield self._reading(device_id, ts, {"value": value}, label)


NSL_KDD_COLUMNS = [
    "duration", "protocol_type", "service", "flag", "src_bytes", "dst_bytes", "land", "wrong_fragment", "urgent",
    "hot", "num_failed_logins", "logged_in", "num_compromised", "root_shell", "su_attempted", "num_root",
    "num_file_creations", "num_shells", "num_access_files", "num_outbound_cmds", "is_host_login", "is_guest_login",
    "count", "srv_count", "serror_rate", "srv_serror_rate", "rerror_rate", "srv_rerror_rate", "same_srv_rate",
    "diff_srv_rate", "srv_diff_host_rate", "dst_host_count", "dst_host_srv_count", "dst_host_same_srv_rate",
    "dst_host_diff_srv_rate", "dst_host_same_src_port_rate", "dst_host_srv_diff_host_rate", "dst_host_serror_rate",
    "dst_host_srv_serror_rate", "dst_host_rerror_rate", "dst_host_srv_rerror_rate",
]
# The categories of the three symbolic features in the full NSL-KDD data, so train and test files one-hot
# encode to the same columns; a value outside these encodes as all zeros in its group.
NSL_KDD_CATEGORIES = {
    "protocol_type": ["icmp", "tcp", "udp"],
    "service": [
        "IRC", "X11", "Z39_50", "aol", "auth", "bgp", "courier", "csnet_ns", "ctf", "daytime", "discard", "domain",
        "domain_u", "echo", "eco_i", "ecr_i", "efs", "exec", "finger", "ftp", "ftp_data", "gopher", "harvest",
        "hostnames", "http", "http_2784", "http_443", "http_8001", "imap4", "iso_tsap", "klogin", "kshell", "ldap",
        "link", "login", "mtp", "name", "netbios_dgm", "netbios_ns", "netbios_ssn", "netstat", "nnsp", "nntp",
        "ntp_u", "other", "pm_dump", "pop_2", "pop_3", "printer", "private", "red_i", "remote_job", "rje", "shell",
        "smtp", "sql_net", "ssh", "sunrpc", "supdup", "systat", "telnet", "tftp_u", "tim_i", "time", "urh_i",
        "urp_i", "uucp", "uucp_path", "vmnet", "whois",
    ],
    "flag": ["OTH", "REJ", "RSTO", "RSTOS0", "RSTR", "S0", "S1", "S2", "S3", "SF", "SH"],
}
NSL_KDD_NUMERIC = [name for name in NSL_KDD_COLUMNS if name not in NSL_KDD_CATEGORIES]
NSL_KDD_ORIGIN_MS = 1704067200000  # 2024-01-01T00:00:00Z: synthetic event time of row 0 (rows are 1 s apart)


class NslKddReader(Reader):
    """NSL-KDD records (41 features, attack name, optional difficulty) split into ``clients`` federated devices.

    features: ``"numeric"`` (default) keeps the 38 numeric features; ``"onehot"`` adds one-hot columns of
        protocol_type, service and flag (``service=http`` ...; 122 metrics), after the numeric ones. Numeric is the
        default because the 84 sparse one-hot columns dominate a reconstruction error without adding much.
    non_iid: False assigns rows to clients uniformly at random (``seed``); True assigns by a stable hash of
        ``column`` (default ``service``), so each client sees its own kinds of traffic, the same in every file.
    label: 1 when the attack name is not ``normal``. ts: ``origin_ms`` + row index seconds (the data has no time).
    Device ids are ``client-00`` ... .
    """

    format = "nsl-kdd"

    def __init__(self, path: Path | str, clients: int = 10, non_iid: bool = False, seed: int = 0,
                 column: str = "service", features: str = "numeric", origin_ms: int = NSL_KDD_ORIGIN_MS,
                 skip_bad: bool = False):
        super().__init__(skip_bad)
        if clients < 1:
            raise ValueError(f"clients must be >= 1, got {clients}")
        if features not in ("numeric", "onehot"):
            raise ValueError(f"features must be 'numeric' or 'onehot', got {features!r}")
        if column not in NSL_KDD_COLUMNS:
            raise ValueError(f"column {column!r} is not an NSL-KDD feature")
        self.path, self.clients, self.non_iid, self.seed = Path(path), clients, non_iid, seed
        self.column, self.features, self.origin_ms = column, features, origin_ms

    @property
    def metric_names(self) -> list[str]:
        if self.features == "numeric":
            return list(NSL_KDD_NUMERIC)
        return NSL_KDD_NUMERIC + [f"{name}={value}" for name, values in NSL_KDD_CATEGORIES.items() for value in values]

    def client_names(self) -> list[str]:
        width = len(str(self.clients - 1))
        return [f"client-{k:0{width}d}" for k in range(self.clients)]

    def _rows(self) -> Iterator[Reading]:
        names, onehot = self.client_names(), self.features == "onehot"
        numeric_at = [(NSL_KDD_COLUMNS.index(name), name) for name in NSL_KDD_NUMERIC]
        categorical_at = [(NSL_KDD_COLUMNS.index(name), name) for name in NSL_KDD_CATEGORIES]
        split_at = NSL_KDD_COLUMNS.index(self.column)
        rng = random.Random(self.seed)
        with open_text(self.path) as f:
            for index, row in enumerate(csv.reader(f)):
                if not row:
                    continue
                self.stats.rows += 1
                client = rng.randrange(self.clients)  # drawn for every row, so the split does not shift on bad rows
                if len(row) not in (42, 43):
                    self._bad_row(self.path, index + 1, f"expected 42 or 43 columns, got {len(row)}")
                    continue
                try:
                    metrics = {name: float(row[i]) for i, name in numeric_at}
                except ValueError as exc:
                    self._bad_row(self.path, index + 1, str(exc))
                    continue
                if onehot:
                    for i, name in categorical_at:
                        for value in NSL_KDD_CATEGORIES[name]:
                            metrics[f"{name}={value}"] = 1.0 if row[i] == value else 0.0
                if self.non_iid:
                    client = zlib.crc32(row[split_at].encode()) % self.clients
                label = 0 if row[41].strip() == "normal" else 1
                yield self._reading(names[client], self.origin_ms + index * 1000, metrics, label)


class IntelLabReader(Reader):
    """The Intel Berkeley Research Lab log: ``date time epoch moteid temperature humidity light voltage``.

    Space separated, no header; one device per mote (``mote-<id>``); ``epoch`` is the mote's own sequence
    number, so event time comes from date and time. Lines with missing fields are bad rows.
    """

    format = "intel-lab"
    metric_names = ["temperature", "humidity", "light", "voltage"]

    def __init__(self, path: Path | str, skip_bad: bool = False):
        super().__init__(skip_bad)
        self.path = Path(path)

    def _rows(self) -> Iterator[Reading]:
        names = self.metric_names
        with open_text(self.path) as f:
            for line, text in enumerate(f, start=1):
                fields = text.split()
                if not fields:
                    continue
                self.stats.rows += 1
                if len(fields) != 8:
                    self._bad_row(self.path, line, f"expected 8 fields, got {len(fields)}")
                    continue
                try:
                    ts = parse_timestamp(f"{fields[0]}T{fields[1]}")
                    mote = int(fields[3])
                    metrics = {name: float(value) for name, value in zip(names, fields[4:])}
                except ValueError as exc:
                    self._bad_row(self.path, line, str(exc))
                    continue
                yield self._reading(f"mote-{mote}", ts, metrics)


class NetLoadReader(Reader):
    """Network device load export: ``timeslot,hostname,ifname,max_metric_value,mean_metric_value`` (hourly).

    One device per interface (``<hostname>/<ifname>``); columns are found by header name, so their order may vary;
    an optional ``label`` column is read as ground truth.
    """

    format = "netload"
    metric_names = ["max_metric_value", "mean_metric_value"]
    KEY_COLUMNS = ["timeslot", "hostname", "ifname"]

    def __init__(self, path: Path | str, skip_bad: bool = False):
        super().__init__(skip_bad)
        self.path = Path(path)

    def _rows(self) -> Iterator[Reading]:
        with open_text(self.path) as f:
            rows = csv.reader(f)
            header = [name.strip() for name in next(rows, [])]
            missing = [name for name in self.KEY_COLUMNS + self.metric_names if name not in header]
            if missing:
                raise ReaderError(self.path, 1, f"header lacks {', '.join(missing)} (got {','.join(header)[:200]!r})")
            at = {name: header.index(name) for name in header}
            t, host, iface = (at[name] for name in self.KEY_COLUMNS)
            metric_at = [(at[name], name) for name in self.metric_names]
            label_at = at.get("label")
            for line, row in enumerate(rows, start=2):
                if not row:
                    continue
                self.stats.rows += 1
                if len(row) != len(header):
                    self._bad_row(self.path, line, f"expected {len(header)} columns, got {len(row)}")
                    continue
                try:
                    ts = parse_timestamp(row[t])
                    metrics = {name: parse_value(row[i]) for i, name in metric_at}
                    label = None if label_at is None else parse_label(row[label_at])
                except ValueError as exc:
                    self._bad_row(self.path, line, str(exc))
                    continue
                if not row[host] or not row[iface]:
                    self._bad_row(self.path, line, "empty hostname or ifname")
                    continue
                yield self._reading(f"{row[host]}/{row[iface]}", ts, metrics, label)


READERS = {
    "asd": MultiEntityCsvReader,
    "csv": MultiEntityCsvReader,
    "nab": NabReader,
    "nsl-kdd": NslKddReader,
    "intel-lab": IntelLabReader,
    "netload": NetLoadReader,
}


def open_reader(fmt: str, path: Path | str, skip_bad: bool = False, **options) -> Reader:
    """The reader of format ``fmt`` (a key of `READERS`) over ``path``; ``options`` go to its constructor."""
    try:
        cls = READERS[fmt]
    except KeyError:
        raise ValueError(f"unknown format {fmt!r}; one of {', '.join(READERS)}") from None
    return cls(path, skip_bad=skip_bad, **options)
