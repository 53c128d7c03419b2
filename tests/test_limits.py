"""Limits on what MUSE parses (muse.calib.names: MAX_DEPTH, MAX_ELEMENTS) and the request
rules that keep clients' choices out of files and metrics: deep nesting is a 4xx or a
one-line CLI error naming the limit, never a 500 or a traceback; the Open Inference
Protocol takes numbers as /v1 does; tenant names are checked before they become labels."""

from __future__ import annotations

import asyncio
import json
import re

import msgspec
import numpy as np
import pytest
from helpers import CURVE, make_registry, rows
from hypothesis import given, settings
from hypothesis import strategies as st

from muse.calib import CalibrationError, ReferenceError, read_calibration
from muse.calib.names import MAX_DEPTH, MAX_ELEMENTS, LimitError, check_limits, parse_document
from muse.calib.reference import ReferenceFile, encode_reference
from muse.core.spec import DeploymentSpec, PredictorSpec, RouteSpec, SpecError, decode_spec, encode_spec
from muse.server.app import MuseApp
from muse.server.auth import add_key, keys_path
from muse.server.cli import main as cli
from muse.server.settings import Settings
from muse.server.testing import ASGIClient, as_json_rows, deploy

DEEP = 100_000


def nested_json(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def nested_toml(depth: int, key: str = "description") -> bytes:
    return f"{key} = ".encode() + b"[" * depth + b"]" * depth + b"\n"


# -- documents -------------------------------------------------------------------------------


@pytest.mark.parametrize("toml", [False, True])
def test_documents_nest_at_most_max_depth(toml):
    make = nested_toml if toml else nested_json
    inside = MAX_DEPTH - 1 if toml else MAX_DEPTH  # a TOML document is a table: one level more
    assert parse_document(make(inside), "doc", toml=toml) is not None
    for depth in (inside + 1, DEEP):
        with pytest.raises(LimitError, match=f"doc: nested deeper than {MAX_DEPTH} levels"):
            parse_document(make(depth), "doc", toml=toml)


def test_toml_dotted_keys_nest_too_and_are_refused_before_parsing():
    """tomllib reads a 50,000-part dotted key in quadratic time (~40 s): refused from the text;
    dots in strings, comments and numbers nest nothing and pass."""
    inside = "a" + ".a" * (MAX_DEPTH - 2) + " = 1\n"  # the root table and MAX_DEPTH - 1 below it
    assert parse_document(inside.encode(), "doc", toml=True)
    for raw in ("a" + ".a" * 50_000 + " = 1", "[" + ".".join(["a"] * 50_000) + "]", '"a" . b' + " .c" * MAX_DEPTH):
        with pytest.raises(LimitError, match=f"doc: nested deeper than {MAX_DEPTH} levels at a dotted key"):
            parse_document(raw.encode(), "doc", toml=True)
    dots = "x." * 100
    text = f'd = "{dots}" # {dots}\ne = \'{dots}\'\nf = """\n{dots}\n"""\ng = 1.5\n'
    assert parse_document(text.encode(), "doc", toml=True)["g"] == 1.5


def test_documents_hold_at_most_max_elements():
    check_limits({"a": [1, 2], "b": {"c": 3}}, "doc", max_elements=5)
    with pytest.raises(LimitError, match="doc: more than 4 values"):
        check_limits({"a": [1, 2], "b": {"c": 3}}, "doc", max_elements=4)
    assert len(parse_document(b"[" + b"0," * (MAX_ELEMENTS - 1) + b"0]", "doc", toml=False)) == MAX_ELEMENTS
    with pytest.raises(LimitError, match=f"more than {MAX_ELEMENTS} values"):
        parse_document(b"[" + b"0," * MAX_ELEMENTS + b"0]", "doc", toml=False)


def test_deep_deployment_files_are_spec_errors_and_one_cli_line(tmp_path, capsys):
    for name, raw in (("deep.toml", nested_toml(DEEP)), ("deep.json", b'{"description": ' + nested_json(DEEP) + b"}")):
        with pytest.raises(SpecError, match=f"{name}: nested deeper than {MAX_DEPTH} levels"):
            decode_spec(raw, name)
        (tmp_path / name).write_bytes(raw)
        for command in ("validate", "apply"):
            assert cli(["deploy", command, str(tmp_path / name), "--registry", str(tmp_path / "reg")]) == 2
            err = capsys.readouterr().err
            assert f"{name}: nested deeper than {MAX_DEPTH} levels" in err and "Traceback" not in err
            assert err.count("\n") == 1


def test_deep_reference_and_calibration_files_are_refused_with_the_limit(tmp_path, lgb_case, capsys):
    reg = make_registry(tmp_path / "reg", {"lightgbm": lgb_case})
    deep = tmp_path / "deep.toml"
    deep.write_bytes(encode_reference(ReferenceFile("deep", CURVE)) + nested_toml(DEEP, "extra"))
    with pytest.raises(ReferenceError, match=f"deep.toml: nested deeper than {MAX_DEPTH} levels"):
        reg.load_reference(str(deep))
    (tmp_path / "log.csv").write_text("margin\n" + "\n".join(map(str, np.linspace(-3, 3, 50))))
    args = ["calib", "fit", "--registry", str(reg.root), "--model", "lightgbm", "--scores", str(tmp_path / "log.csv")]
    assert cli([*args, "--reference", str(deep)]) == 2
    err = capsys.readouterr().err
    assert f"nested deeper than {MAX_DEPTH} levels" in err and "Traceback" not in err
    cal = tmp_path / "calibration.json"
    cal.write_bytes(b'{"name": "x", "knots_x": ' + nested_json(DEEP) + b"}")
    with pytest.raises(CalibrationError, match=f"calibration.json: nested deeper than {MAX_DEPTH}"):
        read_calibration(cal)


# -- requests ----------------------------------------------------------------------------------

OIP = "/v2/models/fraud/infer"
SPEC = DeploymentSpec(
    predictors=[PredictorSpec("a", "1", "fraud", ["lightgbm/1"])], routes=[RouteSpec("*", "fraud", "a")]
)


@pytest.fixture(scope="module")
def served(tmp_path_factory, model_dir, registry):
    from conftest import get_case

    root = tmp_path_factory.mktemp("limits")
    reg = make_registry(root / "reg", {"lightgbm": get_case("lightgbm", model_dir, registry)})
    deploy(reg, SPEC)
    keys = {t: add_key(keys_path(reg.root), t, False)[1] for t in ("acme", "globex")}
    keys["admin"] = add_key(keys_path(reg.root), None, True)[1]
    return reg, keys


def exchange(served, calls, **settings):
    """Run ``calls`` [(method, path, body, key, headers)] through the app in this process (with
    ``settings``); [(status, decoded body)] and the /metrics text afterwards."""
    reg, keys = served

    async def run():
        app = MuseApp(Settings(registry=str(reg.root), poll_interval=3600, **settings))
        answers = []
        async with ASGIClient(app) as client:
            for method, path, body, key, headers in calls:
                raw = body if isinstance(body, bytes) else json.dumps(body).encode()
                h = {"content-type": "application/json", **(headers or {})}
                if key:
                    h["authorization"] = f"Bearer {keys[key]}"
                status, out, _ = await client.request(method, path, raw, h)
                answers.append((status, json.loads(out) if out[:1] == b"{" else out))
            metrics = app.metrics.render().decode()
        return answers, metrics

    return asyncio.run(run())


def oip(data, datatype="FP64", shape=(1, 6), **parameters):
    return {"inputs": [{"name": "features", "shape": list(shape), "datatype": datatype, "data": data}], **parameters}


def v1(features, tenant="acme"):
    return {"tenant": tenant, "intent": "fraud", "events": [{"features": features}]}


def test_deep_nesting_is_a_4xx_naming_the_field_or_the_limit(served):
    deep_data = b'{"inputs": [{"name": "f", "shape": [1, 6], "datatype": "FP64", "data": ' + nested_json(DEEP) + b"}]}"
    deep_unknown = json.dumps(oip([0.5] * 6))[:-1].encode() + b', "extra": ' + nested_json(DEEP) + b"}"
    deep_parameter = json.dumps(oip([0.5] * 6, parameters={"x": [[[1]]]})).encode()
    deep_v1 = b'{"tenant": "acme", "intent": "fraud", "events": [{"features": ' + nested_json(DEEP) + b"}]}"
    deep_nan = json.dumps(oip([float("nan")] + [0.5] * 5))[:-1].encode() + b', "extra": ' + nested_json(DEEP) + b"}"
    answers, _ = exchange(
        served,
        [
            ("POST", OIP, deep_data, "acme", None),
            ("POST", OIP, deep_unknown, "acme", None),
            ("POST", OIP, deep_parameter, "acme", None),
            ("POST", "/v1/score", deep_v1, "acme", None),
            ("POST", OIP, deep_nan, "acme", None),  # the slow path (bare NaN) meets the depth too
            ("POST", OIP, oip([0.5] * 6), "acme", None),  # and the server still answers
        ],
    )
    (s1, b1), (s2, b2), (s3, b3), (s4, b4), (s5, b5), (s6, _) = answers
    assert (s1, b1["field"]) == (422, "$.inputs[0].data") and "flat or as rows" in b1["error"], b1
    assert (s2, b2["field"]) == (400, "$") and f"nested deeper than {MAX_DEPTH} levels" in b2["error"], b2
    assert (s3, b3["field"]) == (422, "$.parameters[...][0]"), b3
    assert (s4, b4["field"]) == (422, "$.events[0].features[0]"), b4
    assert (s5, b5["field"]) == (400, "$") and f"nested deeper than {MAX_DEPTH} levels" in b5["error"], b5
    assert s6 == 200


def test_deep_deployments_posted_to_the_admin_api_are_422_naming_the_limit(served):
    toml = {"content-type": "application/toml"}
    deep_json = b'{"description": ' + nested_json(DEEP) + b"}"
    answers, _ = exchange(
        served,
        [
            ("POST", "/admin/deployment/validate", nested_toml(DEEP), "admin", toml),
            ("POST", "/admin/deployment", nested_toml(DEEP), "admin", toml),
            ("POST", "/admin/deployment/validate", deep_json, "admin", None),
            ("POST", "/admin/deployment/validate", encode_spec(SPEC), "admin", toml),
        ],
    )
    for status, body in answers[:3]:
        assert (status, body["field"]) == (422, "$") and f"nested deeper than {MAX_DEPTH} levels" in body["error"]
    assert answers[3] == (200, {"valid": True})


@pytest.mark.parametrize(
    "value, words",
    [
        ("0.1", "got `str`"),
        (True, "got `bool`"),
        ({"x": 1}, "got `object`"),
    ],
)
def test_oip_takes_numbers_as_v1_does(served, value, words):
    features = [0.5] * 5 + [value]
    answers, _ = exchange(
        served,
        [
            ("POST", "/v1/score", v1(features), "acme", None),
            ("POST", OIP, oip(features), "acme", None),
            ("POST", OIP, oip([features]), "acme", None),
        ],
    )
    (s1, b1), (s2, b2), (s3, b3) = answers
    assert (s1, b1["field"]) == (422, "$.events[0].features[5]") and words in b1["error"]
    assert (s2, b2["field"]) == (422, "$.inputs[0].data") and words in b2["error"] and "data[5]" in b2["error"]
    assert (s3, b3["field"]) == (422, "$.inputs[0].data") and "data[0][5]" in b3["error"]


def test_numbers_beyond_float_range_are_refused_on_both_apis(served):
    """1e400 would be inf: refused by /v1 and by the OIP alike, naming the element."""
    body = json.dumps(oip([0.5] * 6)).replace("0.5]", "1e400]").encode()
    answers, _ = exchange(
        served,
        [
            ("POST", "/v1/score", json.dumps(v1([0.5] * 6)).replace("0.5]", "1e400]").encode(), "acme", None),
            ("POST", OIP, body, "acme", None),
        ],
    )
    (s1, b1), (s2, b2) = answers
    assert (s1, b1["field"]) == (422, "$.events[0].features[5]") and "out of range" in b1["error"]
    assert (s2, b2["field"]) == (422, "$.inputs[0].data") and "out of range" in b2["error"]


def test_binary_tensors_still_carry_nan_as_missing(served):
    X = rows(3, seed=5)
    assert np.isnan(X).any()
    raw = X.astype("<f8").tobytes()
    header = json.dumps(
        {"inputs": [{"name": "f", "shape": [3, 6], "datatype": "FP64", "parameters": {"binary_data_size": len(raw)}}]}
    ).encode()
    with_nulls = oip([r for r in as_json_rows(X)], shape=(3, 6))
    bad_size = json.dumps(
        {"inputs": [{"name": "f", "shape": [3, 6], "datatype": "FP64", "parameters": {"binary_data_size": "144"}}]}
    ).encode()
    length = {"inference-header-content-length": str(len(header))}
    answers, _ = exchange(
        served,
        [
            ("POST", OIP, header + raw, "acme", length),
            ("POST", OIP, with_nulls, "acme", None),
            ("POST", OIP, bad_size + raw, "acme", {"inference-header-content-length": str(len(bad_size))}),
        ],
    )
    (s1, b1), (s2, b2), (s3, b3) = answers
    assert s1 == 200 and s2 == 200 and b1["outputs"][0]["data"] == b2["outputs"][0]["data"], (b1, b2)
    assert (s3, b3["field"]) == (422, "$.inputs[0].parameters.binary_data_size"), b3


HOSTILE = ["", "../../../../srv-evil", "\u202eacme", "a/b", "*", "x" * 129, "a\x00"]


def test_requests_for_invalid_tenants_are_422_and_add_no_label(served):
    calls = []
    for tenant in HOSTILE:
        calls.append(("POST", "/v1/score", v1([0.5] * 6, tenant=tenant), "admin", None))
        calls.append(("POST", OIP, oip([0.5] * 6, parameters={"tenant": tenant}), "admin", None))
        calls.append(("POST", "/v1/score", v1([0.5] * 6, tenant=tenant), "acme", None))
    calls.append(("POST", OIP, oip([0.5] * 6, parameters={"tenant": 5}), "admin", None))
    answers, metrics = exchange(served, calls)
    fields = {"/v1/score": "$.tenant", OIP: "$.parameters.tenant"}
    for (_, path, *_), (status, body) in zip(calls, answers):
        assert (status, body["field"]) == (422, fields[path]), body
        assert body["error"].endswith(f" - at `{fields[path]}`"), body
    assert "srv-evil" not in metrics and "\u202e" not in metrics and 'tenant="*"' not in metrics
    assert 'muse_request_errors_total{intent="fraud",predictor="",reason="invalid",tenant=""}' in metrics


def test_refused_credentials_add_no_label(served):
    """A 403 (another tenant's key) or 401 names nothing a client chose in /metrics: neither the
    tenant it claimed nor the intent in its path."""
    answers, metrics = exchange(
        served,
        [
            ("POST", "/v1/score", v1([0.5] * 6, tenant="newcorp"), "acme", None),
            ("POST", OIP, oip([0.5] * 6, parameters={"tenant": "newcorp"}), "acme", None),
            ("POST", "/v2/models/made-up-intent/infer", oip([0.5] * 6), None, None),
            ("POST", "/v1/score", v1([0.5] * 6, tenant="globex"), "globex", None),
        ],
    )
    assert [status for status, _ in answers] == [403, 403, 401, 200]
    assert "newcorp" not in metrics and "made-up-intent" not in metrics
    assert 'muse_request_errors_total{intent="",predictor="",reason="forbidden",tenant=""} 2.0' in metrics
    assert 'muse_request_errors_total{intent="",predictor="",reason="unauthenticated",tenant=""} 1.0' in metrics
    assert 'tenant="globex"' in metrics  # served tenants keep their labels


def test_admin_promote_refuses_invalid_tenants(served):
    answers, _ = exchange(served, [("POST", "/admin/promote", {"predictor": "a", "tenants": ["../x"]}, "admin", None)])
    status, body = answers[0]
    assert (status, body["field"]) == (422, "$") and "is not a tenant name" in body["error"]


def test_msgspec_refuses_the_oip_schema_without_recursing():
    """The schema is typed down to its leaves: msgspec stops at the first level too many."""
    from muse.server.schemas import InferRequest

    with pytest.raises(msgspec.ValidationError, match=r"got `array` - at `\$\.inputs\[0\]\.data\[0\]\[0\]`"):
        msgspec.json.decode(
            b'{"inputs": [{"name": "f", "shape": [1], "datatype": "FP64", "data": ' + nested_json(DEEP) + b"}]}",
            type=InferRequest,
        )


def test_json_bodies_beyond_max_json_bytes_are_413_and_binary_tensors_are_not(served):
    big_v1 = v1([0.5] * 6)
    big_v1["events"] *= 200  # ~9 KB of JSON
    binary = np.full((200, 6), 0.5).tobytes()
    header = json.dumps(
        {
            "inputs": [
                {"name": "f", "shape": [200, 6], "datatype": "FP64", "parameters": {"binary_data_size": len(binary)}}
            ]
        }
    ).encode()
    answers, _ = exchange(
        served,
        [
            ("POST", "/v1/score", big_v1, "acme", None),
            ("POST", OIP, oip([0.5] * 1200, shape=(200, 6)), "acme", None),
            ("POST", OIP, header + binary, "acme", {"inference-header-content-length": str(len(header))}),
            ("POST", "/v1/score", v1([0.5] * 6), "acme", None),
        ],
        max_json_bytes=4096,
    )
    (s1, b1), (s2, b2), (s3, _), (s4, _) = answers
    assert s1 == s2 == 413 and "--max-json-bytes" in b1["error"] and "binary tensor" in b2["error"], (b1, b2)
    assert s3 == 200 and s4 == 200


def test_a_binary_header_length_of_thousands_of_digits_is_a_400(served):
    header = json.dumps(oip([0.5] * 6)).encode()
    answers, _ = exchange(served, [("POST", OIP, header, "acme", {"inference-header-content-length": "9" * 5000})])
    ((status, body),) = answers
    assert (status, body["field"]) == (400, "inference-header-content-length"), body


# -- large JSON bodies: features parsed off the event loop (server/_rows.pyx raw_rows_matrix) ----

_FEATURES_OF = msgspec.json.Decoder(list[float | None])


def _number_text(draw) -> str:
    """A JSON number as clients write them: repr, exponents of either case and sign, integers
    (huge ones too), negative zeros, subnormals, beyond float range, and the edges of the
    parser's exact fast path (2^53, 10^22, 18 and 19 digits) and beyond it."""
    value = draw(st.floats(allow_nan=False, allow_infinity=False))
    return draw(
        st.sampled_from(
            [
                repr(value),
                json.dumps(value),
                f"{value:e}",
                f"{value:E}".replace("E+", "E"),
                str(draw(st.integers(-(10**30), 10**30))),
                "-0",
                "-0.0",
                "0e0",
                "4.9e-324",
                "1e-400",
                "1e400",
                "-1.7976931348623157e308",
                "9007199254740992",
                "9007199254740993",
                "1e22",
                "1e23",
                "-1.5e-22",
                "123456789012345678",
                "1234567890123456789",
                "0.1000000000000000055511151231257827",
                "2.2250738585072014e-308",
                f"{value:.17g}",
                f"{value:.3f}",
                f"{draw(st.integers(0, 10**18))}e{draw(st.integers(-30, 30))}",
                "0." + "0" * draw(st.integers(990, 1010)) + "1e1000",  # around MAX_NUMBER_CHARS
                "9007199254740993" + "0" * 1200 + "e-1200",
            ]
        )
    )


@st.composite
def feature_texts(draw) -> tuple[bytes, int]:
    """A features value as JSON text (mostly arrays of numbers and nulls, with JSON's blanks
    anywhere), and the width the model expects."""
    width = draw(st.integers(0, 5))
    items = [draw(st.one_of(st.just("null"), st.builds(_number_text, st.just(draw)))) for _ in range(width)]
    if draw(st.booleans()):  # something the fast path must leave to the whole decode
        odd = draw(st.sampled_from(['"1.5"', "true", "false", "[1]", "{}", '{"a": 1}', "nul" + "l", "[]"]))
        items.insert(draw(st.integers(0, len(items))), odd)
    blank = st.sampled_from(["", " ", "\n", "\t ", "\r\n"])
    text = draw(blank) + "[" + draw(blank)
    text += ",".join(draw(blank) + item + draw(blank) for item in items) + draw(blank) + "]" + draw(blank)
    if draw(st.integers(0, 9)) == 0:
        text = draw(st.sampled_from(['{"f0": 1.0}', "1.5", "null", '"x"']))
    return text.encode(), width + draw(st.sampled_from([0, 0, 0, 1, -1]))


_NUMBER = re.compile(rb"-?[0-9][0-9.eE+-]*")


@given(st.lists(feature_texts(), min_size=1, max_size=4), st.booleans())
@settings(max_examples=400, deadline=None)
def test_raw_rows_are_what_the_whole_decode_gives(cases, inferred):
    """raw_rows_matrix gives the very bits of the whole decode (msgspec, then rows_matrix)
    whenever every text is an array of `width` numbers or nulls the whole decode takes (with
    ``inferred``, the width of the first), and None otherwise; it declines only numbers longer
    than MAX_NUMBER_CHARS, which the whole decode then reads: never a different answer."""
    from muse.server._rows import raw_rows_matrix, rows_matrix

    widths = {w for _, w in cases}
    if len(widths) != 1 or -1 in widths:
        cases = [(text, max(0, next(iter(widths)))) for text, _ in cases]
    texts = [text for text, _ in cases]
    try:
        rows = [_FEATURES_OF.decode(t) for t in texts]
        width = len(rows[0]) if inferred else cases[0][1]
        expected = rows_matrix(rows, width) if all(len(r) == width for r in rows) else None
    except (msgspec.ValidationError, msgspec.DecodeError):
        expected = None
    raws = [msgspec.json.decode(t, type=msgspec.Raw) for t in texts]
    got = raw_rows_matrix(raws) if inferred else raw_rows_matrix(raws, cases[0][1])
    if expected is None:
        assert got is None
    elif got is None:  # declined: only for a number too long to read here
        assert any(len(m) > 1000 for t in texts for m in _NUMBER.findall(t)), texts
    else:
        assert got.shape == expected.shape
        assert got.tobytes() == expected.tobytes()  # -0.0 and 0.0 told apart, NaN as NaN


def _large_v1(X: np.ndarray, **change) -> dict:
    events = [{"features": row} for row in as_json_rows(X)]
    for i, features in change.items():
        events[int(i[1:])]["features"] = features
    return {"tenant": "acme", "intent": "fraud", "events": events}


def test_large_bodies_score_as_small_ones_and_name_what_is_wrong(served):
    """A body over LARGE_JSON_BYTES (its features parsed off the loop) scores the events as
    one-event requests do; features by name still work there; a string at event 150 and a
    short row at event 700 are 422s naming the field, as in a small body."""
    from muse.server.api_scoring import LARGE_JSON_BYTES

    X = rows(900, seed=31)
    body = _large_v1(X)
    assert len(json.dumps(body)) >= LARGE_JSON_BYTES
    named = _large_v1(X, e3={f"Column_{j}": v for j, v in enumerate(as_json_rows(X[3:4])[0])})
    bad = _large_v1(X, e150=[0.5] * 3 + ["0.5"] + [0.5] * 2)
    short = _large_v1(X, e700=[0.5] * 5)
    small = [_large_v1(X[i : i + 1]) for i in (0, 3, 899)]
    # a string among the features and an intent not served: the string is named first, large or small
    unrouted = [{**_large_v1(X[: n + 1], e0=[0.5] * 3 + ["0.5"] + [0.5] * 2), "intent": "nope"} for n in (899, 0)]
    bodies = [body, named, bad, short, *small, *unrouted]
    answers, _ = exchange(served, [("POST", "/v1/score", b, "acme", None) for b in bodies])
    (s1, b1), (s2, b2), (s3, b3), (s4, b4), *singles, unrouted_large, unrouted_small = answers
    assert s1 == s2 == 200, b2
    assert len(b1["scores"]) == 900 and b1["scores"] == b2["scores"]
    assert [b1["scores"][i] for i in (0, 3, 899)] == [b["scores"][0] for _, b in singles]
    assert (s3, b3["field"]) == (422, "$.events[150].features[3]") and "got `str`" in b3["error"]
    assert (s4, b4["field"]) == (422, "$.events[700].features") and "expected 6 features" in b4["error"]
    assert unrouted_large == unrouted_small and unrouted_large[0] == 422, unrouted_large
    assert unrouted_large[1]["field"] == "$.events[0].features[3]"
