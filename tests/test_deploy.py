"""Deployment files: validation that names the entry, publishing generations,
shared model copies, ensembles."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from helpers import calibrated_registry, rows

from muse.calib import correct_margins
from muse.core.deploy import DeploymentStore
from muse.core.snapshot import ModelPool, build_snapshot
from muse.core.spec import DeploymentSpec, PredictorSpec, RouteSpec, SpecError, decode_spec, encode_spec
from muse.server.cli import main as cli
from muse.server.testing import as_json_rows, deploy

replace = msgspec.structs.replace
A = PredictorSpec("a", "1", "fraud", ["lightgbm/1"], calibration="lightgbm/1")
ROUTE = RouteSpec("*", "fraud", "a")
BASE = DeploymentSpec(predictors=[A], routes=[ROUTE])
BASE_TOML = """
[[predictors]]
name = "a"
version = "1"
intent = "fraud"
models = ["lightgbm/1"]
calibration = "lightgbm/1"

[[routes]]
tenant = "*"
intent = "fraud"
active = "a"
"""


def with_a(**changes) -> DeploymentSpec:
    """BASE with predictor a changed."""
    return replace(BASE, predictors=[replace(A, **changes)])


@pytest.fixture(scope="module")
def reg(tmp_path_factory, model_dir):
    reg = calibrated_registry(tmp_path_factory.mktemp("deploy"), model_dir)
    return reg


def spec(text: str):
    return decode_spec(text.encode(), "deploy.toml")


def test_base_toml_is_base():
    assert spec(BASE_TOML) == BASE and decode_spec(encode_spec(BASE), "deploy.toml") == BASE


@pytest.mark.parametrize(
    "deployment, message",
    [
        (with_a(models=["nope/1"]), "predictors[0] (a): model nope/1: model 'nope' is not in"),
        (with_a(models=["lightgbm/7"]), "predictors[0] (a): model lightgbm/7: model 'lightgbm' has no version '7'"),
        (
            with_a(calibration="xgb-cal/1"),
            "predictors[0] (a): calibration xgb-cal/1 was fitted for model xgboost-json/1",
        ),
        (
            with_a(models=["lightgbm/1", "xgboost-json/1"]),
            "predictors[0] (a): ensemble member xgboost-json/1 has features",
        ),
        (
            replace(with_a(intent="churn"), routes=[replace(ROUTE, intent="churn")]),
            "predictors[0] (a): unknown reference for intent 'churn'",
        ),
        (replace(BASE, routes=[ROUTE, ROUTE]), "routes[1] (tenant '*', intent 'fraud'): duplicate route"),
        (
            replace(BASE, routes=[replace(ROUTE, active="b")]),
            "routes[0] (tenant '*', intent 'fraud'): active predictor 'b' is not defined",
        ),
        (
            replace(BASE, routes=[replace(ROUTE, shadows=["a"])]),
            "routes[0] (tenant '*', intent 'fraud'): predictor 'a' is both active and shadow",
        ),
        (replace(BASE, predictors=[A, A]), "predictors[1] (a): duplicate predictor name"),
        (
            with_a(combine="mean_logit", models=["lightgbm/1", "lightgbm-copy/1"]),
            "predictors[0] (a): calibration lightgbm/1 was fitted for model lightgbm/1",
        ),  # an ensemble needs its own calibration
    ],
)
def test_validation_names_the_entry(reg, deployment, message):
    with pytest.raises(SpecError) as err:
        DeploymentStore(reg).validate(deployment, source="deploy.toml")
    assert message in str(err.value)
    assert str(err.value).startswith("deploy.toml: ")


def test_schema_errors_name_the_path(reg):
    with pytest.raises(SpecError, match=r"deploy.toml: .*at `\$.predictors\[0\].models`"):
        spec(BASE_TOML.replace('models = ["lightgbm/1"]', "models = []"))
    with pytest.raises(SpecError, match=r"Object contains unknown field `colour` - at `\$.routes\[0\]`"):
        spec(BASE_TOML.replace('active = "a"', 'active = "a"\ncolour = "red"'))
    with pytest.raises(SpecError, match="not valid TOML"):
        spec("[[predictors]\n")
    with pytest.raises(SpecError, match=r"length >= 1 - at `\$.routes`"):
        spec("routes = []\n" + BASE_TOML.split("[[routes]]")[0])  # an empty deployment would take everyone offline


def test_apply_publishes_generations_and_refuses_broken_ones(reg, tmp_path, capsys):
    store = DeploymentStore(reg)
    good = tmp_path / "good.toml"
    good.write_bytes(encode_spec(BASE))
    assert cli(["deploy", "apply", str(good), "--registry", str(reg.root)]) == 0
    first = store.current_generation()
    assert cli(["deploy", "apply", str(good), "--registry", str(reg.root)]) == 0
    assert store.current_generation() == first + 1
    bad = tmp_path / "bad.toml"
    bad.write_bytes(encode_spec(with_a(models=["gone/1"])))
    capsys.readouterr()
    assert cli(["deploy", "apply", str(bad), "--registry", str(reg.root)]) == 2
    err = capsys.readouterr().err
    assert f"muse deploy: error: {bad}: predictors[0] (a): model gone/1" in err
    assert store.current_generation() == first + 1 and store.generations()[-1] == first + 1
    assert cli(["deploy", "validate", str(good), "--registry", str(reg.root)]) == 0
    assert cli(["deploy", "show", "--registry", str(reg.root)]) == 0
    assert f"# generation {first + 1}" in capsys.readouterr().out


def test_predictors_share_one_loaded_model_and_ensembles_combine(reg):
    deployment = replace(
        BASE,
        predictors=[
            A,
            PredictorSpec("b", "1", "fraud", ["lightgbm/1"]),
            PredictorSpec("ens", "1", "fraud", ["lightgbm/1", "lightgbm-copy/1"]),
        ],
    )
    snap = build_snapshot(deployment, ModelPool(reg), generation=1)
    a, b, ens = (snap.predictors[n] for n in ("a", "b", "ens"))
    assert a.batchers[0] is b.batchers[0] is ens.batchers[0]
    assert ens.batchers[1] is not ens.batchers[0]  # another NAME/VERSION is another copy
    X = rows(50, seed=31)
    model = a.batchers[0].model
    expected = correct_margins(model.predict(X, margin=True), model.manifest.beta)
    index = np.zeros(len(X), dtype=np.int64)  # the identity map: uncalibrated
    np.testing.assert_allclose(b.score(X, index).mapped, expected, rtol=1e-12)
    np.testing.assert_allclose(ens.score(X, index).mapped, expected, rtol=1e-12)
    assert a.map_index("acme") != a.map_index("someone-else") == a.maps[None]


def test_a_replaced_generation_is_freed_without_the_cycle_collector(reg):
    """Serving freezes what it has loaded (gc.freeze); that is only safe while snapshots hold no
    reference cycles, so a model no generation names must go with its last reference."""
    import asyncio
    import gc
    import weakref

    from muse.server.metrics import Metrics
    from muse.server.serving import Serving

    other = DeploymentSpec(
        predictors=[PredictorSpec("x", "1", "fraud", ["xgboost-json/1"])], routes=[RouteSpec("*", "fraud", "x")]
    )
    store = DeploymentStore(reg)

    async def run():
        store.apply(BASE)
        serving = Serving(reg, Metrics())
        await serving.start()
        try:
            route = serving.snapshot.route("acme", "fraud")
            await route.active.score_async(
                rows(3, seed=2), route.active.map_index("acme"), "acme"
            )  # through the batcher and model thread
            batcher, snapshot = weakref.ref(route.active.batchers[0]), weakref.ref(serving.snapshot)
            del route
            store.apply(other)
            assert await serving.refresh()
            return batcher, snapshot
        finally:
            await serving.stop()

    gc.disable()  # only reference counting may free it
    try:
        batcher, snapshot = asyncio.run(run())
        assert snapshot() is None and batcher() is None  # and with the batcher, its model
    finally:
        gc.enable()
        gc.unfreeze()


def test_every_served_score_is_recorded_and_idle_lanes_are_dropped(reg, tmp_path):
    """Through the app's ASGI entry, in process: each response's scores reach the drift window and
    the score log once, per tenant; a lane unused for IDLE_RECORDS records is dropped, and made
    again, recording as before, on the tenant's next request."""
    import asyncio
    import json

    import polars as pl

    from muse.server.app import MuseApp
    from muse.server.recording import IDLE_RECORDS
    from muse.server.settings import Settings
    from muse.server.testing import ASGIClient

    deploy(reg, BASE)

    async def post(client, tenant, X):
        body = json.dumps({"tenant": tenant, "intent": "fraud", "events": [{"features": r} for r in as_json_rows(X)]})
        status, raw, _ = await client.request("POST", "/v1/score", body.encode())
        assert status == 200, raw
        return json.loads(raw)["scores"]

    async def run():
        # polls by hand below; the log is flushed at shut-down
        app = MuseApp(Settings(registry=str(reg.root), auth=False, poll_interval=3600, score_log=str(tmp_path / "log")))
        async with ASGIClient(app) as client:
            served = [(t, await post(client, t, rows(n, seed=n))) for t, n in (("acme", 3), ("acme", 1), ("globex", 2))]
            app.serving.record_served()
            lane = app.serving.lane("acme", "fraud")
            for _ in range(IDLE_RECORDS):
                app.serving.record_served()
            kept = app.serving.lane("acme", "fraud") is lane
            app.serving.record_served()
            dropped = app.serving.lane("acme", "fraud") is not lane
            served.append(("acme", await post(client, "acme", rows(2, seed=7))))
        return served, kept, dropped, app.metrics.drift

    served, kept, dropped, drift = asyncio.run(run())
    assert kept and dropped
    frame = pl.concat([pl.read_parquet(f) for f in sorted((tmp_path / "log").rglob("*.parquet"))])
    for tenant in ("acme", "globex"):
        want = [s for t, scores in served if t == tenant for s in scores]
        assert frame.filter(pl.col("tenant") == tenant)["mapped"].to_list() == want
        np.testing.assert_array_equal(drift._rings[(tenant, "fraud", "a")].current(), want)
