"""One rule for names (muse.calib.names): names that become paths, tenant names, and tenant
names as file names.  Property tests: valid names round-trip, hostile ones are refused, an
encoded tenant never leaves its folder and decodes back."""

from __future__ import annotations

import pathlib

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from muse.calib import AlertRateCurve, identity_map, make_calibration
from muse.calib.artifact import ModelIdentity
from muse.calib.names import (
    MAX_NAME_LENGTH,
    MAX_TENANT_BYTES,
    NAME_RE,
    Name,
    check_name,
    check_tenant,
    is_tenant,
    tenant_file_stem,
    tenant_from_file_stem,
)
from muse.core.registry import Registry, RegistryError
from muse.core.spec import DeploymentSpec, PredictorSpec, RouteSpec, SpecError, decode_spec
from muse.server.auth import add_key, read_keys

NAMES = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}\Z")
HOSTILE_PIECES = ["/", "\\", "\x00", "\n", "\r", "\t", "\u202e", "\u200b", "\u2028", "\ufeff", "*"]
HOSTILE_NAMES = [
    "",
    ".",
    "..",
    "../x",
    "../../x",
    "a/b",
    "/abs",
    "a\\b",
    ".hidden",
    "-flag",
    "a\n",
    "a\x00",
    "x" * (MAX_NAME_LENGTH + 1),
]
HOSTILE_TENANTS = [
    "",
    ".",
    "..",
    "../../../../srv-evil",
    "a/b",
    "a\\b",
    "*",
    "acme*",
    "\u202eacme",
    "ac\u200bme",
    "acme\n",
    "a\x00",
    " acme",
    "acme ",
    "x" * (MAX_TENANT_BYTES + 1),
    "é" * (MAX_TENANT_BYTES // 2 + 1),
]


def in_folder(folder: pathlib.Path, file_name: str) -> bool:
    path = folder / file_name
    return path.parent == folder and path.resolve().parent == folder.resolve()


# -- names -------------------------------------------------------------------------------------


@settings(max_examples=200)
@given(NAMES)
def test_valid_names_round_trip(name):
    assert check_name("model name", name) == name
    assert msgspec.json.decode(msgspec.json.encode(name), type=Name) == name
    assert in_folder(pathlib.Path("/registry/models"), name)


@settings(max_examples=300)
@given(st.text(max_size=140))
def test_a_name_is_accepted_only_where_it_is_a_plain_file_name(text):
    """Whatever the text: accepted by check_name exactly when msgspec's Name accepts it, and
    then never a separator, never '.'/'..', never a hidden file, never a line break."""
    try:
        check_name("version", text)
        accepted = True
    except ValueError as exc:
        accepted = False
        assert "version" in str(exc) and repr(text) in str(exc) and "letters, digits" in str(exc)
    try:
        msgspec.json.decode(msgspec.json.encode(text), type=Name)
        assert accepted
    except msgspec.ValidationError:
        assert not accepted
    if accepted:
        assert NAME_RE.match(text) and "/" not in text and "\n" not in text and not text.startswith(".")
        assert 1 <= len(text) <= MAX_NAME_LENGTH and in_folder(pathlib.Path("/r"), text)


@settings(max_examples=200)
@given(NAMES, st.sampled_from([*HOSTILE_PIECES, "..", " "]), st.data())
def test_names_with_a_hostile_piece_are_refused(name, piece, data):
    at = data.draw(st.integers(0, len(name)))
    with pytest.raises(ValueError, match="is not a valid name"):
        check_name("calibration version", name[:at] + piece + name[at:] if piece != ".." else piece + name)


@pytest.mark.parametrize("value", HOSTILE_NAMES)
def test_hostile_names_are_refused(value):
    with pytest.raises(ValueError, match="is not a valid name"):
        check_name("calibration name", value)
    with pytest.raises(msgspec.ValidationError):
        msgspec.json.decode(msgspec.json.encode(value), type=Name)


# -- tenant names ------------------------------------------------------------------------------


@pytest.mark.parametrize("value", HOSTILE_TENANTS)
def test_hostile_tenants_are_refused(value):
    with pytest.raises(ValueError, match="is not a valid tenant name") as info:
        check_tenant(value)
    assert repr(value) in str(info.value)
    with pytest.raises(ValueError):
        tenant_file_stem(value)


@pytest.mark.parametrize("value", ["acme", "Acme Corp", "café", "银行", "a.b", "%41", "~x", "None", "a" * 128])
def test_tenants_are_printable_names(value):
    assert check_tenant(value) == value
    stem = tenant_file_stem(value)
    assert tenant_from_file_stem(stem) == value


@settings(max_examples=300)
@given(st.text(max_size=140))
def test_any_accepted_tenant_encodes_inside_its_folder_and_back(text):
    if not is_tenant(text):
        with pytest.raises(ValueError):
            tenant_file_stem(text)
        return
    assert text.isprintable() and not {"/", "\\", "\x00", "*"} & set(text) and text not in (".", "..")
    stem = tenant_file_stem(text)
    assert not {"/", "\\", "\x00"} & set(stem) and not stem.startswith(".") and stem.isascii()
    assert len(f"{stem}.json".encode()) <= 255  # a file name on every common file system
    assert in_folder(pathlib.Path("/registry/calibrations/c/1/tenants"), f"{stem}.json")
    assert tenant_from_file_stem(stem) == text


@settings(max_examples=200)
@given(st.text(min_size=1, max_size=40), st.sampled_from(HOSTILE_PIECES), st.data())
def test_tenants_with_a_hostile_character_are_refused(text, piece, data):
    at = data.draw(st.integers(0, len(text)))
    assert not is_tenant(text[:at] + piece + text[at:])


@settings(max_examples=200)
@given(st.text(min_size=1, max_size=30), st.text(min_size=1, max_size=30))
def test_distinct_tenants_have_distinct_files(a, b):
    if a != b and is_tenant(a) and is_tenant(b):
        assert tenant_file_stem(a) != tenant_file_stem(b)


@settings(max_examples=300)
@given(st.text(alphabet=st.sampled_from("aZ09._-%~2EeF/ "), max_size=12) | st.text(max_size=12))
def test_a_stem_decodes_only_if_it_is_the_one_encoding(stem):
    """So each tenant has exactly one file: '%61cme' or '%2e' are not read as 'acme' or '.'."""
    try:
        tenant = tenant_from_file_stem(stem)
    except ValueError:
        return
    assert tenant_file_stem(tenant) == stem


# -- where the rules apply: registry paths, calibrations, deployments, keys ----------------------


CURVE = AlertRateCurve([0.5], [0.1])


def calibration(tenant=None, name="fraud", version="1"):
    return make_calibration(
        identity_map(),
        name=name,
        version=version,
        model=ModelIdentity("m", "1", "0" * 64),
        reference_name="fraud",
        reference=CURVE,
        beta=1.0,
        sample_size=10,
        tenant=tenant,
    )


def test_registry_paths_refuse_hostile_names(tmp_path):
    reg = Registry(tmp_path / "reg")
    for call in (
        lambda: reg.model_dir("../x"),
        lambda: reg.model_dir("m", "../../x"),
        lambda: reg.calibration_dir("a", "../x"),
        lambda: reg.load_calibration("../../x/1"),
        lambda: reg.next_calibration_version("../../x"),
        lambda: reg.reference_path("../x"),
        lambda: reg.load_reference("../../etc/passwd"),
    ):
        with pytest.raises(ValueError, match="is not a valid name"):
            call()
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("tenant", ["../../../../srv-evil", "", "\u202e", "a/b"])
def test_calibrations_refuse_hostile_names(tenant):
    with pytest.raises(ValueError, match="tenant"):
        calibration(tenant=tenant)
    with pytest.raises(ValueError, match="calibration version"):
        calibration(version="../x")


def test_tenant_calibrations_round_trip_through_their_file_names(tmp_path):
    reg = Registry(tmp_path / "reg")
    tenants = ["acme", "Acme Corp", "café", ".dot", "%41", "None"]
    reg.save_calibration(calibration())
    folder = reg.calibrations_dir / "fraud" / "1" / "tenants"
    for tenant in tenants:
        path = reg.save_calibration(calibration(tenant))
        assert path.parent == folder
    assert reg.calibration_tenants("fraud") == sorted(tenants)
    for tenant in tenants:
        assert reg.load_calibration("fraud/1", tenant=tenant).tenant == tenant
    assert (folder / "acme.json").exists() and (folder / "Acme%20Corp.json").exists()
    assert sorted(p.name for p in (tmp_path / "reg").iterdir()) == ["calibrations"]


def test_a_file_that_is_not_an_encoded_tenant_is_named_with_its_fix(tmp_path):
    reg = Registry(tmp_path / "reg")
    reg.save_calibration(calibration())
    folder = reg.calibrations_dir / "fraud" / "1" / "tenants"
    folder.mkdir()
    (folder / "Acme Corp.json").write_text("{}")  # as an older muse wrote it
    with pytest.raises(RegistryError, match=r"Acme Corp\.json: not a tenant calibration file name.*Acme%20Corp\.json"):
        reg.calibration_tenants("fraud")


ROUTE_TOML = """
[[predictors]]
name = "a"
version = "1"
intent = "fraud"
models = ["m/1"]

[[routes]]
tenant = {tenant}
intent = "fraud"
active = "a"
"""


@pytest.mark.parametrize("tenant", ['""', '"../../x"', '"\\u202Eacme"', '"acme*"', '"."'])
def test_deployment_routes_refuse_hostile_tenants(tenant):
    with pytest.raises(SpecError, match=r"deploy\.toml: tenant .* is not a tenant name .* - at `\$\.routes\[0\]`"):
        decode_spec(ROUTE_TOML.format(tenant=tenant).encode(), "deploy.toml")
    with pytest.raises(SpecError, match="is not a tenant name"):
        decode_spec(msgspec.json.encode(msgspec.toml.decode(ROUTE_TOML.format(tenant=tenant))), "deploy.json")


def test_deployment_routes_take_tenants_and_the_default():
    for tenant in ('"*"', '"acme"', '"Acme Corp"'):
        spec = decode_spec(ROUTE_TOML.format(tenant=tenant).encode(), "deploy.toml")
        assert spec.routes[0].tenant == msgspec.toml.decode(f"t = {tenant}")["t"]
    with pytest.raises(ValueError, match="is not a tenant name"):
        RouteSpec("", "fraud", "a")
    with pytest.raises(SpecError, match=r"matching regex .* - at `\$\.predictors\[0\]\.version`"):
        decode_spec(ROUTE_TOML.format(tenant='"*"').replace('"1"', '"1\\n"').encode(), "deploy.toml")
    assert DeploymentSpec([PredictorSpec("a", "1", "fraud", ["m/1"])], [RouteSpec("*", "fraud", "a")])


@pytest.mark.parametrize("tenant", ["../../x", "", "*", "\u202eacme"])
def test_keys_for_hostile_tenants_are_refused(tmp_path, tenant):
    path = tmp_path / "keys.toml"
    with pytest.raises(ValueError, match="is not a valid tenant name"):
        add_key(path, tenant, False)
    assert not path.exists()
    add_key(path, "acme", False)
    assert [k.tenant for k in read_keys(path).keys] == ["acme"]


def test_muse_keys_add_refuses_a_hostile_tenant_in_one_line(tmp_path, capsys):
    from muse.server.cli import main as cli

    assert cli(["keys", "add", "--registry", str(tmp_path), "--tenant", "../../x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("muse keys: error: --tenant '../../x' is not a valid tenant name (holds '/')")
    assert err.count("\n") == 1 and not (tmp_path / "keys.toml").exists()
    assert cli(["keys", "add", "--registry", str(tmp_path), "--tenant", "acme"]) == 0
