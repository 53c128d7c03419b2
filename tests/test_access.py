"""Who may do what: the admin API with auth off, /metrics behind a credential, metrics
without tenant names (the app in this process, through ASGI)."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import get_case
from helpers import make_registry

from muse.core.spec import DeploymentSpec, PredictorSpec, RouteSpec
from muse.server.app import MuseApp
from muse.server.auth import add_key, keys_path
from muse.server.settings import Settings
from muse.server.testing import ASGIClient, deploy

SPEC = DeploymentSpec(
    predictors=[PredictorSpec("a", "1", "fraud", ["lightgbm/1"])], routes=[RouteSpec("*", "fraud", "a")]
)
SCORE = {"tenant": "acme", "intent": "fraud", "events": [{"features": [0.5] * 6}]}


@pytest.fixture(scope="module")
def served(tmp_path_factory, model_dir, registry):
    root = tmp_path_factory.mktemp("access")
    reg = make_registry(root / "reg", {"lightgbm": get_case("lightgbm", model_dir, registry)})
    deploy(reg, SPEC)
    keys = {"acme": add_key(keys_path(reg.root), "acme", False)[1]}
    keys["admin"] = add_key(keys_path(reg.root), None, True)[1]
    keys["metrics"] = add_key(keys_path(reg.root), None, False, metrics=True)[1]
    return reg, keys


def exchange(served, settings: dict, calls: list[tuple[str, str, object, str | None]]) -> list[tuple[int, object]]:
    """[(status, decoded body)] of ``calls`` [(method, path, body, key name)] to an app with ``settings``."""
    reg, keys = served

    async def run():
        app = MuseApp(Settings(registry=str(reg.root), poll_interval=3600, **settings))
        answers = []
        async with ASGIClient(app) as client:
            for method, path, body, key in calls:
                headers = {"content-type": "application/json"}
                if key:
                    headers["authorization"] = f"Bearer {keys[key]}"
                raw = b"" if body is None else json.dumps(body).encode()
                status, out, _ = await client.request(method, path, raw, headers)
                answers.append((status, json.loads(out) if out[:1] == b"{" else out.decode()))
        return answers

    return asyncio.run(run())


def test_without_auth_scoring_is_open_but_the_admin_api_wants_an_admin_key(served):
    (score, ready, anonymous_admin, tenant_admin, admin, bad_key) = exchange(
        served,
        {"auth": False},
        [
            ("POST", "/v1/score", SCORE, None),
            ("GET", "/v2/health/ready", None, None),
            ("POST", "/admin/rollback", {}, None),
            ("GET", "/admin/deployment", None, "acme"),
            ("GET", "/admin/deployment", None, "admin"),
            ("POST", "/v1/score", SCORE, "metrics"),  # a credential sent is checked: a metrics key scores nothing
        ],
    )
    assert score[0] == 200, score
    assert ready[1]["ready"] is True and "authentication is off" in ready[1]["warnings"][0], ready
    assert anonymous_admin[0] == 403 and "auth is off for scoring, not for the admin API" in anonymous_admin[1]["error"]
    assert tenant_admin[0] == 403
    assert admin[0] == 200 and admin[1]["generation"] == 1, admin
    assert bad_key[0] == 403 and bad_key[1]["error"] == "this key may only read /metrics", bad_key


def test_with_auth_ready_has_no_warning_and_anonymous_scoring_is_401(served):
    (ready, score) = exchange(served, {}, [("GET", "/v2/health/ready", None, None), ("POST", "/v1/score", SCORE, None)])
    assert "warnings" not in ready[1] and score[0] == 401


def test_metrics_auth_wants_an_admin_or_metrics_key(served):
    answers = exchange(
        served,
        {"metrics_auth": True},
        [("GET", "/metrics", None, key) for key in (None, "acme", "metrics", "admin")],
    )
    assert [status for status, _ in answers] == [401, 403, 200, 200]
    assert "muse keys add --metrics" in answers[1][1]["error"]
    assert "muse_requests_total" in answers[2][1]
    # without --metrics-auth, /metrics answers anyone
    assert exchange(served, {}, [("GET", "/metrics", None, None)])[0][0] == 200


@pytest.mark.parametrize("tenant_labels", [True, False])
def test_tenant_labels_can_be_turned_off(served, tenant_labels):
    score, metrics = exchange(
        served,
        {"tenant_labels": tenant_labels},
        [("POST", "/v1/score", SCORE, "acme"), ("GET", "/metrics", None, None)],
    )
    assert score[0] == 200
    text = metrics[1]
    assert ('muse_events_scored_total{intent="fraud",predictor="a",tenant="acme"}' in text) == tenant_labels, text
    assert ('muse_events_scored_total{intent="fraud",predictor="a",tenant=""}' in text) == (not tenant_labels), text


def test_a_key_has_one_role(tmp_path):
    with pytest.raises(ValueError, match=r"for one tenant .* for the admin API .* or for reading /metrics"):
        add_key(tmp_path / "keys.toml", "acme", False, metrics=True)


@pytest.mark.parametrize(
    ("flag", "value"), [("--body-timeout", "0"), ("--score-log-max-mb", "0"), ("--max-json-bytes", "-1")]
)
def test_serve_flags_out_of_range_are_one_line_naming_the_flag(served, capsys, flag, value):
    from muse.server.cli import main

    reg, _ = served
    assert main(["serve", "--registry", str(reg.root), flag, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("muse serve: error:") and flag in err and "\n" not in err, err
