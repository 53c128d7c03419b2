"""Labels: `muse labels import` (validation, storage, last label wins) and `muse calib status --labels`
(alert rate, recall and precision per series and edge, checked against a hand computation)."""

from __future__ import annotations

import datetime
import pathlib
import tempfile

import polars as pl
import pytest
from helpers import CURVE
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from muse.calib import ReferenceFile
from muse.calib.names import MAX_EVENT_ID_CHARS
from muse.core.labels import MAX_SHOWN, SCHEMA, LabelFileError, LabelStore, import_labels
from muse.server.cli import main as cli
from muse.server.testing import build_registry

UTC = datetime.timezone.utc
T0 = datetime.datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def reg(tmp_path):
    return build_registry(tmp_path / "reg", references=[ReferenceFile("fraud", CURVE)])


def stored(reg) -> dict[str, int]:
    return dict(LabelStore(reg).labels().select("event_id", "label").iter_rows())


def write(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text)
    return path


def import_file(reg, path) -> int:
    return cli(["labels", "import", str(path), "--registry", str(reg.root)])


# -- import ------------------------------------------------------------------------------------------


def test_import_csv(reg, tmp_path, capsys):
    f = write(tmp_path / "l.csv", "event_id,label,label_time\n007,1,2026-03-01T12:00:00Z\ntx-2,0,\n3,true,2026-03-02\n")
    assert import_file(reg, f) == 0
    out = capsys.readouterr().out
    assert "read 3 rows" in out and "stored 3 rows, 3 events" in out and "relabelled 0 events" in out
    frame = LabelStore(reg).labels()
    assert frame.schema == SCHEMA
    assert stored(reg) == {"007": 1, "tx-2": 0, "3": 1}  # ids are text: 007 keeps its zeros
    times = dict(frame.select("event_id", "label_time").iter_rows())
    assert times == {"007": T0, "tx-2": None, "3": datetime.datetime(2026, 3, 2, tzinfo=UTC)}
    assert [p.name for _, p in LabelStore(reg).files()] == ["labels-00000001.parquet"]


def test_import_parquet_int_ids_booleans_and_times(reg, tmp_path, capsys):
    f = tmp_path / "l.parquet"
    pl.DataFrame(
        {
            "event_id": [1, 2, 3],
            "label": [True, False, True],
            "label_time": [datetime.datetime(2026, 3, 1, 12), None, None],  # naive: UTC
            "amount": [1.0, 2.0, 3.0],  # other columns are ignored
        }
    ).write_parquet(f)
    assert import_file(reg, f) == 0
    assert "(Parquet)" in capsys.readouterr().out
    assert stored(reg) == {"1": 1, "2": 0, "3": 1}  # client ints are logged as decimal strings
    assert LabelStore(reg).labels()["label_time"].to_list() == [T0, None, None]


def test_last_label_wins_across_imports_and_within_a_file(reg, tmp_path, capsys):
    assert import_file(reg, write(tmp_path / "a.csv", "event_id,label\na,1\nb,0\na,0\nc,1\n")) == 0
    out = capsys.readouterr().out
    assert "stored 4 rows, 3 events (1 row repeat" in out
    assert stored(reg) == {"a": 0, "b": 0, "c": 1}  # within a file the later row wins
    assert import_file(reg, write(tmp_path / "b.csv", "event_id,label\nb,1\nc,1\nd,0\n")) == 0
    assert "relabelled 2 events that had a label already (1 changed)" in capsys.readouterr().out
    assert stored(reg) == {"a": 0, "b": 1, "c": 1, "d": 0}  # the later import wins
    assert [seq for seq, _ in LabelStore(reg).files()] == [1, 2]


def test_refused_rows_reported_by_line_and_the_rest_stored(reg, tmp_path, capsys):
    rows = [
        "ok-1,1,",  # line 2
        "bad-2,2,",  # 3
        "bad-3,-1,",  # 4
        "bad-4,0.5,",  # 5
        "bad-5,,",  # 6: no label
        "bad-6,yes,",  # 7
        ",1,",  # 8: no event id
        "x" * (MAX_EVENT_ID_CHARS + 1) + ",1,",  # 9
        '"bell\x07",1,',  # 10
        "bad-11,1,yesterday",  # 11
        "ok-12,0,2026-03-01 12:00:00",  # 12
        "ok-13,1.0,",  # 13: exactly 1
        "ok-14,FALSE,",  # 14
    ]
    f = write(tmp_path / "l.csv", "event_id,label,label_time\n" + "\n".join(rows) + "\n")
    assert import_file(reg, f) == 0
    captured = capsys.readouterr()
    assert "refused 9 rows:" in captured.err
    for line, why in [
        (3, "label is not 0 or 1 (or true/false): '2'"),
        (4, "'-1'"),
        (5, "'0.5'"),
        (6, "label is missing"),
        (7, "'yes'"),
        (8, "event_id is missing"),
        (9, f"longer than {MAX_EVENT_ID_CHARS} characters"),
        (10, "unprintable character"),
        (11, "label_time is not a date-time"),
    ]:
        assert f"  line {line}: " in captured.err and why in captured.err.split(f"  line {line}: ")[1].splitlines()[0]
    assert "\x07" not in captured.err  # shown escaped
    assert "stored 4 rows" in captured.out and "refused 9 rows (listed above); the others are stored" in captured.out
    assert stored(reg) == {"ok-1": 1, "ok-12": 0, "ok-13": 1, "ok-14": 0}


def test_parquet_refusals_name_the_row_and_many_are_counted(reg, tmp_path, capsys):
    f = tmp_path / "l.parquet"
    labels = [2] * (MAX_SHOWN + 5) + [1]
    pl.DataFrame({"event_id": [f"e{i}" for i in range(len(labels))], "label": labels}).write_parquet(f)
    assert import_file(reg, f) == 0
    err = capsys.readouterr().err
    assert "  row 1: label is not 0 or 1" in err and f"  row {MAX_SHOWN}: " in err
    assert f"  row {MAX_SHOWN + 1}: " not in err and "  and 5 more" in err
    assert stored(reg) == {f"e{len(labels) - 1}": 1}


def test_every_row_refused_stores_nothing_and_fails(reg, tmp_path, capsys):
    assert import_file(reg, write(tmp_path / "l.csv", "event_id,label\na,2\n,1\n")) == 1
    err = capsys.readouterr().err
    assert "line 2: " in err and "line 3: " in err and "stored nothing: every row was refused" in err
    assert LabelStore(reg).files() == [] and stored(reg) == {}
    assert import_file(reg, write(tmp_path / "h.csv", "event_id,label\n")) == 1  # no rows at all
    assert "the file holds no rows" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("l.csv", "event_id,lable\n1,1\n", "no column 'label' (has: 'event_id', 'lable')"),
        ("l.csv", "id,label\n1,1\n", "no column 'event_id'"),
        ("l.csv", "", "empty; a label file has a header line"),
        ("l.csv", "event_id,label\n1,1,1\n", "cannot read as CSV"),
        ("l.csv", b"event_id,label\n\xff\xfe,1\n", "write it as UTF-8 CSV"),
        ("l.csv", "event_id,label,label\n1,1,1\n", "column 'label' appears more than once"),
        ("l.json", '{"event_id": 1}', "unknown file type '.json'; give a .parquet or .csv file"),
        ("l.parquet", "not parquet", "cannot read as Parquet"),
        ("missing.csv", None, "no such file"),
    ],
)
def test_file_level_errors_exit_2_and_name_the_file(reg, tmp_path, capsys, name, content, expected):
    f = tmp_path / name
    if isinstance(content, bytes):
        f.write_bytes(content)
    elif content is not None:
        f.write_text(content)
    assert import_file(reg, f) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"muse labels: error: {f}: ") and expected in err
    assert LabelStore(reg).files() == []


def test_unusable_column_types_and_registry(reg, tmp_path, capsys):
    f = tmp_path / "l.parquet"
    pl.DataFrame({"event_id": [1.5], "label": [1]}).write_parquet(f)
    assert import_file(reg, f) == 2
    assert "column 'event_id' is Float64; event ids are text or whole numbers" in capsys.readouterr().err
    pl.DataFrame({"event_id": ["a"], "label": [1], "label_time": [12345]}).write_parquet(f)
    assert import_file(reg, f) == 2
    assert "column 'label_time' is Int64" in capsys.readouterr().err
    ok = write(tmp_path / "ok.csv", "event_id,label\na,1\n")
    assert cli(["labels", "import", str(ok), "--registry", str(tmp_path / "typo")]) == 2
    assert "--registry" in capsys.readouterr().err and not (tmp_path / "typo").exists()


def test_imports_are_bounded(reg, tmp_path, monkeypatch, capsys):
    import muse.core.labels as labels

    rows = write(tmp_path / "l.csv", "event_id,label\na,1\nb,0\nc,1\n")
    monkeypatch.setattr(labels, "MAX_ROWS", 2)
    assert import_file(reg, rows) == 2
    assert "3 rows, over the 2 an import reads; split it into several imports" in capsys.readouterr().err
    pl.read_csv(rows).write_parquet(tmp_path / "l.parquet")
    assert import_file(reg, tmp_path / "l.parquet") == 2
    assert "over the 2 an import reads" in capsys.readouterr().err
    monkeypatch.setattr(labels, "MAX_FILE_BYTES", 10)
    assert import_file(reg, rows) == 2
    assert "bytes, over the 10 an import reads" in capsys.readouterr().err
    assert LabelStore(reg).files() == []


def test_a_concurrent_import_never_replaces_another(reg, tmp_path, monkeypatch):
    store = LabelStore(reg)
    store.append(pl.DataFrame({"event_id": ["a"], "label": [1]}))
    real, calls = store.files, []

    def files():  # the next import first sees the directory as it was before the first import
        calls.append(1)
        return [] if len(calls) == 1 else real()

    monkeypatch.setattr(store, "files", files)
    path = store.append(pl.DataFrame({"event_id": ["a"], "label": [0]}))
    assert path.name == "labels-00000002.parquet" and [seq for seq, _ in real()] == [1, 2]
    assert stored(reg) == {"a": 0}
    assert not list(store.directory.glob(".*"))  # no temporary file left


def test_reader_ignores_temporary_files_and_names_a_broken_file(reg):
    store = LabelStore(reg)
    store.append(pl.DataFrame({"event_id": ["a"], "label": [1]}))
    (store.directory / ".labels-1-abc.parquet.tmp").write_bytes(b"half a file")
    assert stored(reg) == {"a": 1}
    (store.directory / "labels-00000002.parquet").write_bytes(b"torn")
    with pytest.raises(LabelFileError, match=r"labels-00000002\.parquet: cannot read"):
        store.labels()


imports = st.lists(
    st.lists(st.tuples(st.sampled_from(["a", "b", "c", "7", "e-5"]), st.integers(0, 1)), min_size=1, max_size=8),
    min_size=1,
    max_size=5,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(imports=imports, parquet=st.booleans())
def test_stored_labels_equal_the_imports_applied_in_order(imports, parquet):
    expected: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        (root / "reg").mkdir()
        store = LabelStore(root / "reg")
        for n, rows in enumerate(imports):
            frame = pl.DataFrame({"event_id": [r[0] for r in rows], "label": [r[1] for r in rows]})
            f = root / f"import-{n}.{'parquet' if parquet else 'csv'}"
            frame.write_parquet(f) if parquet else frame.write_csv(f)
            result = import_labels(store, f)
            assert result.read.refused_count == 0
            expected.update(dict(rows))  # later rows, then later imports, win
        assert dict(store.labels().select("event_id", "label").iter_rows()) == expected


# -- calib status --labels -----------------------------------------------------------------------


def log_rows(rows: list[tuple], with_ids: bool = True) -> pl.DataFrame:
    """Score-log records from (seconds after T0, tenant, predictor, role, event_id, mapped)."""
    frame = pl.DataFrame(
        {
            "time": [T0 + datetime.timedelta(seconds=r[0]) for r in rows],
            "tenant": [r[1] for r in rows],
            "intent": ["fraud"] * len(rows),
            "predictor": [r[2] for r in rows],
            "version": ["1"] * len(rows),
            "role": [r[3] for r in rows],
            "generation": [1] * len(rows),
            "margin": [0.0] * len(rows),
            "corrected": [r[5] for r in rows],
            "mapped": [r[5] for r in rows],
            "request_id": [f"req-{i}" for i in range(len(rows))],
            "event_id": pl.Series([r[4] for r in rows], dtype=pl.Utf8),
        },
        schema_overrides={"time": pl.Datetime("us", "UTC"), "generation": pl.Int64},
    )
    return frame if with_ids else frame.drop("request_id", "event_id")


def write_log(reg, rows: list[tuple], with_ids: bool = True, seq: int = 1) -> None:
    """REGISTRY/scorelog/ holding ``rows`` (see log_rows) as its file number ``seq``."""
    log = reg.root / "scorelog"
    log.mkdir(exist_ok=True)
    log_rows(rows, with_ids).write_parquet(log / f"scores-{seq:013d}-1-000001.parquet")


def status_lines(reg, capsys, *flags) -> tuple[int, list[str]]:
    code = cli(["calib", "status", "--registry", str(reg.root), "--min-samples", "1000", *flags])
    return code, capsys.readouterr().out.splitlines()


def series(lines: list[str], predictor: str, role: str, tenant: str) -> tuple[list[str], list[list[str]]]:
    """The label table's counts and per-edge [edge, alert rate, recall, precision] of one series."""
    start = next(i for i, line in enumerate(lines) if line.split()[:3] == [predictor, role, tenant] and "[" not in line)
    first = lines[start].split()
    return first[3:7], [first[7:]] + [lines[start + k].split() for k in range(1, len(CURVE.edges))]


def test_status_labels_against_a_hand_computation(reg, tmp_path, capsys):
    # fraud-v1 active, tenant acme: events e1..e8 and one row logged without an event id.
    # e2 is logged twice (a retry): its last score, 0.7 at t=10, counts, though its file sorts first.
    write_log(
        reg,
        [
            (10, "acme", "fraud-v1", "active", "e2", 0.7),
            (1, "acme", "fraud-v1", "active", "e1", 0.9),
            (3, "acme", "fraud-v1", "active", "e3", 0.55),
            (4, "acme", "fraud-v1", "active", "e4", 0.3),
            (5, "acme", "fraud-v1", "active", "e5", 0.1),
            (6, "acme", "fraud-v1", "active", "e6", 0.65),
            (7, "acme", "fraud-v1", "active", "e7", 0.85),
            (8, "acme", "fraud-v1", "active", "e8", 0.05),
            (9, "acme", "fraud-v1", "active", None, 0.95),
            (3, "acme", "fraud-v2", "shadow", "e3", 0.7),  # the same events through the shadow: its own series
            (5, "acme", "fraud-v2", "shadow", "e5", 0.1),
            (11, "beta", "fraud-v1", "active", "e100", 0.9),  # a tenant with no labels
        ],
    )
    write_log(reg, [(2, "acme", "fraud-v1", "active", "e2", 0.1)], seq=2)
    labels = "event_id,label\ne1,1\ne2,1\ne3,0\ne4,1\ne5,0\ne6,0\nnot-in-log,1\n"
    assert import_file(reg, write(tmp_path / "l.csv", labels)) == 0
    capsys.readouterr()

    code, lines = status_lines(reg, capsys, "--labels")
    assert code == 0  # too few scores to judge drift: the labels do not change the exit status
    # fraud-v1/acme, labelled e1..e6 (fraud e1, e2, e4), unlabelled e7, e8 and the row without an id.
    # Among labelled: >= 0.2: e1 e2 e3 e4 e6 alert, e1 e2 e4 caught; >= 0.5: e1 e2 e3 e6, e1 e2;
    # >= 0.6: e1 e2 e6, e1 e2; >= 0.8: e1, e1.
    counts, edges = series(lines, "fraud-v1", "active", "acme")
    assert counts == ["9", "6", "3", "3"]  # events, labelled, unlabelled, fraud
    assert edges == [
        ["0.2", f"{5 / 6:.3f}", "1.000", f"{3 / 5:.3f}"],
        ["0.5", f"{4 / 6:.3f}", f"{2 / 3:.3f}", "0.500"],
        ["0.6", "0.500", f"{2 / 3:.3f}", f"{2 / 3:.3f}"],
        ["0.8", f"{1 / 6:.3f}", f"{1 / 3:.3f}", "1.000"],
    ]
    # fraud-v2/acme: e3 (0.7) and e5 (0.1), neither fraud: recall undefined; no alert at 0.8: precision too.
    counts, edges = series(lines, "fraud-v2", "shadow", "acme")
    assert counts == ["2", "2", "0", "0"]
    assert edges == [
        ["0.2", "0.500", "-", "0.000"],
        ["0.5", "0.500", "-", "0.000"],
        ["0.6", "0.500", "-", "0.000"],
        ["0.8", "0.000", "-", "-"],
    ]
    counts, edges = series(lines, "fraud-v1", "active", "beta")
    assert counts == ["1", "0", "1", "0"] and all(e[1:] == ["-", "-", "-"] for e in edges)

    code, plain = status_lines(reg, capsys)
    assert code == 0 and not any("labelled" in line for line in plain)
    assert [line for line in lines if line in plain] == plain  # --labels only adds lines


def test_status_labels_on_a_log_without_event_ids(reg, capsys):
    write_log(reg, [(i, "acme", "fraud-v1", "active", None, i / 10) for i in range(5)], with_ids=False)
    code, lines = status_lines(reg, capsys, "--labels")
    assert code == 0
    assert any("no labels in" in line and "muse labels import" in line for line in lines)
    assert any("holds no event ids" in line for line in lines)
    counts, edges = series(lines, "fraud-v1", "active", "acme")
    assert counts == ["5", "0", "5", "0"] and all(e[1:] == ["-", "-", "-"] for e in edges)


def test_status_labels_warns_when_tenants_share_labelled_ids(reg, tmp_path, capsys):
    rows = [(1, "acme", "fraud-v1", "active", "1001", 0.9), (2, "globex", "fraud-v1", "active", "1001", 0.1)]
    rows += [(3, "acme", "fraud-v1", "active", "a-7", 0.5)]
    write_log(reg, rows)
    assert import_file(reg, write(tmp_path / "l.csv", "event_id,label\n1001,1\na-7,0\n")) == 0
    capsys.readouterr()
    code = cli(["calib", "status", "--registry", str(reg.root), "--min-samples", "1000", "--labels"])
    out, err = capsys.readouterr()
    assert code == 0 and "1 event ids labelled without a tenant appear under several tenants" in err
    lines = out.splitlines()
    assert series(lines, "fraud-v1", "active", "globex")[0] == ["1", "1", "0", "1"]  # acme's label, on globex


def test_labels_that_name_a_tenant_label_only_its_events(reg, tmp_path, capsys):
    rows = [(1, "acme", "fraud-v1", "active", "1001", 0.9), (2, "globex", "fraud-v1", "active", "1001", 0.1)]
    rows += [(3, "globex", "fraud-v1", "active", "g-2", 0.7)]
    write_log(reg, rows)
    labels = "event_id,tenant,label\n1001,acme,1\ng-2,,0\n1001," + "x" * 200 + ",1\n"  # names: 128 bytes at most
    assert import_file(reg, write(tmp_path / "l.csv", labels)) == 0
    assert "line 4: tenant is not a tenant name" in capsys.readouterr().err
    stored = LabelStore(reg).labels()
    assert stored.select("event_id", "tenant", "label").rows() == [("1001", "acme", 1), ("g-2", None, 0)]
    _, lines = status_lines(reg, capsys, "--labels")
    assert series(lines, "fraud-v1", "active", "acme")[0] == ["1", "1", "0", "1"]
    assert series(lines, "fraud-v1", "active", "globex")[0] == ["2", "1", "1", "0"]  # its 1001 is not acme's
    # a later label for the same id and tenant replaces it; one for another tenant is its own
    assert import_file(reg, write(tmp_path / "m.csv", "event_id,tenant,label\n1001,acme,0\n1001,globex,1\n")) == 0
    stored = LabelStore(reg).labels()
    assert sorted(stored.select("event_id", "tenant", "label").rows(), key=str) == sorted(
        [("1001", "acme", 0), ("1001", "globex", 1), ("g-2", None, 0)], key=str
    )


def test_label_files_from_before_the_tenant_column_read_as_naming_none(reg):
    store = LabelStore(reg)
    store.directory.mkdir(parents=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    old = pl.DataFrame({"event_id": ["e1"], "label": [1], "label_time": [None], "imported_at": [now]})
    old.cast({"label": pl.Int8, "label_time": pl.Datetime("us", "UTC")}).write_parquet(
        store.directory / "labels-00000001.parquet"
    )
    assert store.labels().select("event_id", "tenant", "label").rows() == [("e1", None, 1)]
