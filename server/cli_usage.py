"""`muse usage`: showback, what each tenant used, from the score log and from a running
server's /metrics.

Two sources, each saying what the other cannot:

* the score log (server/scorelog.py): the rows each tenant had scored by its active
  predictors, within any window (--since), as long as the files are kept -- but only the
  requests that were sampled (`muse serve --score-log-sample`, not recorded in the files),
  and rows only: the log holds no request id;
* /metrics (server/metrics.py): requests answered, rows scored, request bytes, requests and
  rows refused for quota, latency -- every request, but counted since the server started,
  whatever --since says.

Shadow rows in the log are MUSE's own work (a candidate scoring the same events), not the
tenant's, and are not counted."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import pathlib
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from typing import Any

import polars as pl
from prometheus_client.parser import text_string_to_metric_families

from muse.calib.names import is_tenant
from muse.calib.samples import is_url, query_score_log
from muse.core.registry import Registry
from muse.core.spec import parse_duration

from .cli_args import add_registry, add_score_log
from .metrics import MAX_TENANT_LABELS, OTHER

SAMPLE_NOTE = (
    "rows logged are the rows of the requests the score log kept: equal to rows scored only at "
    "`muse serve --score-log-sample 1` (the fraction is not recorded in the files)"
)
SCRAPE_TIMEOUT = 10.0  # seconds
MAX_SCRAPE_BYTES = 64 << 20  # /metrics of a server with its 1,000 tenant labels is a few MiB


def register(sub) -> None:
    p = sub.add_parser(
        "usage",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help="showback: rows, requests and bytes per tenant, from the score log and a server's /metrics",
        description=(
            "One row per tenant (and intent, with --by intent), for the tenants in either source.\n\n"
            "From the score log: rows logged within --since. Only active predictors' rows count: shadow\n"
            "rows are MUSE's own work, not the tenant's. The log keeps the requests sampled by\n"
            "`muse serve --score-log-sample` (equal to rows scored only at 1) and no request id: rows,\n"
            "not requests.\n\n"
            "From a running server's /metrics (--metrics-url): requests answered (200), rows scored,\n"
            "request bytes, requests refused for quota (429), rows refused (of the refusals made once\n"
            "the rows were counted) and the mean latency of answered requests -- counted since the\n"
            "server started, whatever --since says."
        ),
    )
    add_registry(p)
    add_score_log(p)
    p.add_argument(
        "--since",
        metavar="DURATION",
        help="only rows logged this recently: 90s, 15m, 2h, 7d (default: the whole log); not for /metrics",
    )
    p.add_argument("--by", choices=["intent"], help="one row per tenant and intent")
    p.add_argument(
        "--metrics-url",
        metavar="URL",
        help="a running server's /metrics (http://HOST:PORT is enough) for requests, bytes, quota and latency",
    )
    p.add_argument("--key", help="an admin or metrics key, for a server run with --metrics-auth")
    p.add_argument(
        "--format",
        choices=["table", "csv", "json"],
        default="table",
        help="table (with totals and notes), csv (a header line) or json (a list of objects)",
    )
    p.set_defaults(func=cmd_usage, remote="read")


# -- the window ----------------------------------------------------------------------------


def cutoff(since: str | None, now: datetime.datetime) -> datetime.datetime | None:
    if since is None:
        return None
    delta = parse_duration("--since", since)
    try:
        return now - delta
    except OverflowError:
        raise ValueError(
            f"--since {since}: longer than the calendar goes back; leave --since out for the whole log"
        ) from None


# -- the two sources -----------------------------------------------------------------------


@dataclasses.dataclass
class Usage:
    logged_rows: int = 0
    requests: int = 0
    rows_scored: int = 0
    request_bytes: int = 0
    quota_refused_requests: int = 0
    quota_refused_rows: int = 0
    model_seconds: float = 0.0  # native model calls' time, shared among their rows' tenants
    latency_sum: float = 0.0  # seconds, of the requests answered
    latency_count: int = 0

    def add(self, other: Usage) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    @property
    def mean_latency_ms(self) -> float | None:
        return 1000 * self.latency_sum / self.latency_count if self.latency_count else None

    def metered(self) -> bool:
        """Whether /metrics counted anything this report shows."""
        return any((self.requests, self.rows_scored, self.request_bytes, self.quota_refused_requests))


Key = tuple[str, ...]  # (tenant,) or (tenant, intent)


@dataclasses.dataclass
class Logged:
    rows: dict[Key, int]
    first: datetime.datetime | None = None  # the earliest and latest row counted
    last: datetime.datetime | None = None


def read_logged(path: pathlib.Path | str, since: datetime.datetime | None, by_intent: bool) -> Logged:
    """Active rows per tenant (and intent) in the score log at ``path``, at or after ``since``."""
    keys = ["tenant", "intent"] if by_intent else ["tenant"]

    def query(scan: pl.LazyFrame) -> pl.LazyFrame:
        rows = scan.filter(pl.col("role") == "active")
        if since is not None:
            rows = rows.filter(pl.col("time") >= since)
        return rows.group_by(keys).agg(
            pl.len().alias("rows"), pl.col("time").min().alias("first"), pl.col("time").max().alias("last")
        )

    frame = query_score_log(path, query)
    if frame is None:
        return Logged({})
    rows = {tuple("" if v is None else str(v) for v in r[:-3]): int(r[-3]) for r in frame.iter_rows()}
    firsts = [t for t in frame["first"].to_list() if t is not None]
    lasts = [t for t in frame["last"].to_list() if t is not None]
    return Logged(rows, min(firsts, default=None), max(lasts, default=None))


def metrics_url(url: str) -> str:
    """``url`` itself, or its /metrics when it names only the server (http://HOST:PORT)."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"--metrics-url {url!r}: not an http(s) URL; use http://HOST:PORT (or its /metrics)")
    if parts.path in ("", "/"):
        parts = parts._replace(path="/metrics")
    return urllib.parse.urlunsplit(parts)


def scrape_url(url: str, key: str | None = None, timeout: float = SCRAPE_TIMEOUT) -> list[tuple[str, dict, float]]:
    """Every sample of the Prometheus text at ``url`` as (name, labels, value); ``key`` for a
    server run with --metrics-auth.  Errors are ValueErrors naming --metrics-url and the fix."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    req = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read(MAX_SCRAPE_BYTES + 1)
        if len(raw) > MAX_SCRAPE_BYTES:
            raise ValueError(
                f"--metrics-url {url}: more than {MAX_SCRAPE_BYTES >> 20} MiB; is it a MUSE server's /metrics?"
            )
        text = raw.decode()
    except urllib.error.HTTPError as exc:
        said = _error_text(exc)
        if exc.code in (401, 403):
            fix = (
                "is --key an admin or metrics key (`muse keys add --metrics`)?"
                if key
                else "pass --key with an admin or metrics key (`muse keys add --metrics`)"
            )
        else:
            fix = "is it a MUSE server's /metrics?"
        raise ValueError(f"--metrics-url {url}: answered {exc.code}{said}; {fix}") from None
    except (urllib.error.URLError, OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ValueError(f"--metrics-url {url}: cannot read it ({reason}); is the server running there?") from None
    try:
        return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]
    except ValueError as exc:
        raise ValueError(
            f"--metrics-url {url}: not Prometheus metrics ({exc}); is it a MUSE server's /metrics?"
        ) from None


def _error_text(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read())
        return f" ({body['error']})" if isinstance(body, dict) and isinstance(body.get("error"), str) else ""
    except (ValueError, OSError):
        return ""


def metered_usage(samples: Iterable[tuple[str, dict, float]], by_intent: bool) -> dict[Key, Usage]:
    """What the server counted per tenant (and intent), from its /metrics samples."""
    usage: dict[Key, Usage] = {}
    for name, labels, value in samples:
        if "tenant" not in labels:
            continue
        key = (labels["tenant"], labels.get("intent", "")) if by_intent else (labels["tenant"],)
        n = int(value)
        if name == "muse_requests_total" and labels.get("code") == "200":
            field = "requests"
        elif name == "muse_events_scored_total":
            field = "rows_scored"
        elif name == "muse_request_bytes_total":
            field = "request_bytes"
        elif name == "muse_request_errors_total" and labels.get("reason") == "over_quota":
            field = "quota_refused_requests"
        elif name == "muse_rejected_rows_total":
            field = "quota_refused_rows"
        elif name == "muse_request_duration_seconds_sum":
            u = usage.setdefault(key, Usage())
            u.latency_sum += value
            continue
        elif name == "muse_model_seconds_total":
            u = usage.setdefault(key, Usage())
            u.model_seconds += value
            continue
        elif name == "muse_request_duration_seconds_count":
            field = "latency_count"
        else:
            continue
        u = usage.setdefault(key, Usage())
        setattr(u, field, getattr(u, field) + n)
    return usage


# -- the report ----------------------------------------------------------------------------

# (field in csv and json, table header); the first columns are the key's
LOG_COLUMNS = [("logged_rows", "rows logged")]
METRIC_COLUMNS = [
    ("requests", "requests"),
    ("rows_scored", "rows scored"),
    ("request_bytes", "request bytes"),
    ("quota_refused_requests", "429s"),
    ("quota_refused_rows", "rows refused"),
    ("model_seconds", "model s"),
    ("mean_latency_ms", "mean ms"),
]


def cmd_usage(args: argparse.Namespace) -> int:
    now = datetime.datetime.now(datetime.timezone.utc)
    since = cutoff(args.since, now)  # checked before any reading
    by_intent = args.by == "intent"
    url = metrics_url(args.metrics_url) if args.metrics_url else None
    if args.key and not url:
        raise ValueError("--key is for /metrics: pass --metrics-url too")
    source: pathlib.Path | str
    if args.scores and is_url(args.scores):
        source = args.scores
    elif args.scores:
        source = pathlib.Path(args.scores)
        if not source.exists():
            raise ValueError(f"--scores {source}: no such directory; pass a `muse serve` score log directory")
    else:
        registry = pathlib.Path(args.registry)
        if not registry.is_dir():
            raise ValueError(f"{registry}: no such registry directory; check --registry")
        source = Registry(registry).score_log  # on object storage: the URL the replicas upload to
    present = isinstance(source, str) or source.exists()
    logged = read_logged(source, since, by_intent) if present else Logged({})
    metered = metered_usage(scrape_url(url, args.key), by_intent) if url else {}

    usage: dict[Key, Usage] = {}
    for key, rows in logged.rows.items():
        usage.setdefault(key, Usage()).logged_rows = rows
    for key, u in metered.items():
        if u.metered():  # e.g. tenant "" holding only requests refused for their key
            usage.setdefault(key, Usage()).add(u)
    key_names = ["tenant", "intent"] if by_intent else ["tenant"]
    columns = LOG_COLUMNS + (METRIC_COLUMNS if url else [])
    window = f" in the last {args.since}" if args.since else ""
    empty = f"no scores logged{window} in {source}"
    if not present:
        empty += " (no such directory: the server writes it unless --score-log-sample 0; --scores for another)"
    report = sorted(usage.items())

    if args.format == "json":
        print(json.dumps([_record(key_names, key, u, columns, since) for key, u in report], indent=1))
    elif args.format == "csv":
        out = csv.writer(sys.stdout, lineterminator="\n")
        out.writerow(key_names + [field for field, _ in columns])
        for key, u in report:
            record = _record(key_names, key, u, columns, since)
            out.writerow(["" if record[c] is None else record[c] for c in key_names + [f for f, _ in columns]])
    else:
        if not logged.rows:
            print(empty)
        if report:
            _print_table(key_names, columns, report)
            _print_notes(args, source, logged, since, url, usage)
    if not logged.rows and args.format != "table":
        print(f"muse usage: {empty}", file=sys.stderr)
    return 0


def _record(key_names: list[str], key: Key, u: Usage, columns: list[tuple[str, str]], since) -> dict[str, Any]:
    record: dict[str, Any] = dict(zip(key_names, key))
    for field, _ in columns:
        value = getattr(u, field)
        record[field] = round(value, 6) if isinstance(value, float) else value
    record["logged_since"] = since.isoformat() if since is not None else None
    record["logged_rows_note"] = SAMPLE_NOTE
    return record


def _label(value: str) -> str:
    """A tenant or intent as the table shows it: no control characters from a client's value."""
    if value == "":
        return "(none)"
    return value if is_tenant(value) else repr(value)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return f"{value:,}"


def _print_table(key_names: list[str], columns: list[tuple[str, str]], report: list[tuple[Key, Usage]]) -> None:
    total = Usage()
    for _, u in report:
        total.add(u)
    headers = key_names + [header for _, header in columns]
    lines = [[_label(k) for k in key] + [_cell(getattr(u, f)) for f, _ in columns] for key, u in report]
    lines.append(["total"] + [""] * (len(key_names) - 1) + [_cell(getattr(total, f)) for f, _ in columns])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    keys = len(key_names)

    def row(cells: list[str]) -> str:
        left = [c.ljust(w) for c, w in zip(cells[:keys], widths)]
        right = [c.rjust(w) for c, w in zip(cells[keys:], widths[keys:])]
        return "  ".join(left + right).rstrip()

    print(row(headers))
    for line in lines[:-1]:
        print(row(line))
    print(row(["-" * w for w in widths]))
    print(row(lines[-1]))


def _print_notes(args, source, logged: Logged, since, url: str | None, usage: dict[Key, Usage]) -> None:
    span = ""
    if logged.first is not None and logged.last is not None:
        span = f"; rows from {logged.first:%Y-%m-%d %H:%M:%S} to {logged.last:%Y-%m-%d %H:%M:%S} UTC"
    window = f"since {since:%Y-%m-%d %H:%M:%S} UTC (--since {args.since})" if since is not None else "the whole log"
    print(f"rows logged: active predictors' rows in {source}, {window}{span}; shadow rows are not counted")
    print(f"note: {SAMPLE_NOTE}")
    if url:
        print(f"requests to mean ms: counted by {url} since the server started, whatever --since says")
    tenants = {key[0] for key in usage}
    if "" in tenants:
        print("tenant (none): requests the server counted without a tenant (it runs with --no-tenant-labels)")
    if any(len(key) > 1 and key[1] == "" for key in usage):
        print("intent (none): requests refused before their intent was read, or naming an intent not served")
    if OTHER in tenants and url:
        print(f"{OTHER}: in /metrics, every tenant beyond the first {MAX_TENANT_LABELS:,} a server worker saw")
