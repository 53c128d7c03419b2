"""The container image and the Kubernetes and KServe manifests (Containerfile, deploy/).

Every manifest parses and the Kubernetes resources validate, strictly (no unknown field),
against the JSON schemas of the oldest and newest Kubernetes versions we claim, bundled in
kubernetes-validate (offline).  KServe's custom resources have no bundled schema: their own
fields are checked against KServe's CRDs (below) and the Kubernetes types they embed
(Container, PodSpec) against Kubernetes' schemas.  The base is rendered with kustomize when a
kustomize binary (or kubectl's built-in) is on PATH.  The Deployment is held to what the
server does: its probe paths are the server's public health endpoints and answer as the
probes expect, its arguments parse with `muse serve`'s own parser, its port is the one the
image and the Service use, and everything the server writes is on a writable volume.

The overlay deploy/k8s/object-store (an s3:// registry, no volume) is built twice: by kustomize
where it is on PATH, and always by this file from the base and the overlay's patch files
(the strategic-merge subset they use; the two are compared where kustomize runs).  Both are
validated strictly and held to the server: the registry is a URL the object-store client
accepts, the mirror's cache is a writable volume, the replica id is the pod's name and one the
server accepts, the score log is each pod's own emptyDir, and the grace period covers the
score log's last upload."""

from __future__ import annotations

import asyncio
import copy
import functools
import importlib.resources
import json
import pathlib
import random
import re
import shlex
import shutil
import subprocess
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml
from packaging.version import Version

from muse.calib.samples import is_url
from muse.core import objectstore, remote
from muse.server import replica
from muse.server.app import ROUTES, MuseApp
from muse.server.cli import build_parser
from muse.server.settings import Settings
from muse.server.testing import ASGIClient

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"  # its kustomization names BASE: `kubectl apply -k deploy/k8s` applies the base
BASE = K8S / "base"
OVERLAY = K8S / "object-store"
CONTAINERFILE = ROOT / "Containerfile"
# The oldest Kubernetes release the manifests are written for, and the newest whose schemas
# kubernetes-validate bundles.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
KSERVE_GROUP = "serving.kserve.io"
BASE_KINDS = sorted(
    [
        "ConfigMap",
        "Secret",
        "PersistentVolumeClaim",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    ]
)

# -- KServe: its own fields, from its CRDs ---------------------------------------------------
# charts/kserve-crd/templates/serving.kserve.io_{clusterservingruntimes,inferenceservices}.yaml
# and pkg/constants/constants.go of kserve/kserve at aaac4e294dae2c7b1aa1886447793f3aa1c30912
# (2026-08-21): the properties of ServingRuntimeSpec, of SupportedModelFormat, of ModelSpec's
# KServe part and of the predictor's ComponentExtensionSpec that these manifests use.
SERVING_RUNTIME_SPEC = {
    "affinity", "annotations", "builtInAdapter", "containers", "disabled", "grpcDataEndpoint", "grpcEndpoint",
    "hostIPC", "httpDataEndpoint", "imagePullSecrets", "labels", "multiModel", "nodeSelector", "protocolVersions",
    "replicas", "resourceClaims", "schedulerName", "storageHelper", "supportedModelFormats", "tolerations",
    "volumes", "workerSpec",
}  # fmt: skip
PROTOCOLS = ["v1", "v2", "grpc-v1", "grpc-v2"]  # constants.InferenceServiceProtocol
SERVING_RUNTIME = {
    "type": "object",
    "required": ["containers"],
    "propertyNames": {"enum": sorted(SERVING_RUNTIME_SPEC)},
    "properties": {
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "supportedModelFormats": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "additionalProperties": False,
                "properties": {
                    "name": {"type": "string"},
                    "version": {"type": "string"},
                    "autoSelect": {"type": "boolean"},
                    "priority": {"type": "integer", "minimum": 1},
                },
            },
        },
        "protocolVersions": {"type": "array", "items": {"enum": PROTOCOLS}},
        "multiModel": {"type": "boolean"},
        "containers": {"type": "array", "minItems": 1},
    },
}
MODEL_OWN = {  # ModelSpec = these + an inline corev1.Container (its name optional)
    "type": "object",
    "required": ["modelFormat"],
    "properties": {
        "modelFormat": {
            "type": "object",
            "required": ["name"],
            "additionalProperties": False,
            "properties": {"name": {"type": "string"}, "version": {"type": "string"}},
        },
        "runtime": {"type": "string"},
        "runtimeVersion": {"type": "string"},
        "protocolVersion": {"enum": PROTOCOLS},
        "storageUri": {"type": "string"},
    },
}
PREDICTOR_OWN = {  # ComponentExtensionSpec's fields used here; the rest of a predictor is a PodSpec
    "minReplicas": {"type": "integer", "minimum": 0},
    "maxReplicas": {"type": "integer", "minimum": 0},
    "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
    "scaleTarget": {"type": "integer", "minimum": 1},
}


# -- reading ------------------------------------------------------------------------------------


def documents(path: pathlib.Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# The resources: the base's and KServe's (the overlay's files are patches, checked below).
MANIFESTS = sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml" and OVERLAY not in p.parents)


def resources() -> dict[str, dict[str, Any]]:
    """kind -> the one resource of that kind in deploy/k8s/base and deploy/kserve."""
    found: dict[str, dict[str, Any]] = {}
    for path in MANIFESTS:
        for doc in documents(path):
            assert doc["kind"] not in found, f"{path}: a second {doc['kind']}"
            found[doc["kind"]] = doc
    return found


def kube_validate(doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


@functools.cache
def schema_of(name: str, version: str) -> jsonschema.Draft202012Validator:
    """A strict validator for one Kubernetes type (``container-v1``, ``podspec-v1``) from the
    schemas kubernetes-validate bundles, resolved as kubernetes_validate.validate resolves them."""
    schemas = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    release = [v for v in kubernetes_validate.utils.all_versions() if Version(v) <= Version(version)][-1]
    folder = schemas / f"v{release}-local-strict"
    schema = json.loads((folder / f"{name}.json").read_text())
    definitions = json.loads((folder / "_definitions.json").read_text())
    registry = referencing.Resource.from_contents(definitions) @ referencing.Registry()
    registry = referencing.Resource.from_contents(schema) @ registry
    return jsonschema.Draft202012Validator(schema, registry=registry)


def container_of(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def expanded_args(container: dict[str, Any], settings: dict[str, str]) -> list[str]:
    """The container's args as Kubernetes expands them: $(NAME) from its environment."""
    env = dict(settings)
    env.update({e["name"]: e.get("value", "") for e in container.get("env", [])})
    out = []
    for arg in container["args"]:
        for name in re.findall(r"\$\((\w+)\)", arg):
            assert name in env, f"{arg}: ${name} is defined neither in the ConfigMap nor in env"
        out.append(re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], arg))
    return out


def instructions(path: pathlib.Path) -> list[tuple[str, str]]:
    """A Containerfile as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("#") and not current:
            continue
        current += line.rstrip().removesuffix("\\") + " "
        if not line.rstrip().endswith("\\"):
            if current.strip():
                logical.append(current.strip())
            current = ""
    return [(i.split(None, 1)[0].upper(), i.split(None, 1)[1]) for i in logical]


def stages(path: pathlib.Path) -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions, FROM first, in file order."""
    out: dict[str, list[tuple[str, str]]] = {}
    name = None
    for op, rest in instructions(path):
        if op == "FROM":
            name = rest.split()[-1] if " AS " in rest.upper() else str(len(out))
            out[name] = []
        if name is not None:
            out[name].append((op, rest))
    return out


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


def render(directory: pathlib.Path) -> list[dict[str, Any]]:
    command = kustomize_command()
    if command is None:
        pytest.skip("no kustomize: neither `kustomize` nor `kubectl` (which has it built in) is on PATH")
    done = subprocess.run([*command, str(directory)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d is not None]


# -- every manifest -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_manifest_parses_and_names_its_kind(path):
    docs = documents(path)
    assert docs, f"{path}: no document"
    for doc in docs:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
        assert doc["metadata"]["name"], path


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kubernetes_resources_validate_against_the_kubernetes_schemas(version):
    checked = []
    for path in MANIFESTS:
        for doc in documents(path):
            if doc["apiVersion"].split("/")[0] == KSERVE_GROUP:
                continue  # custom resources: test_kserve_*
            kube_validate(doc, version)
            checked.append(doc["kind"])
    assert sorted(checked) == BASE_KINDS


def test_the_validation_refuses_an_unknown_field_and_a_wrong_type():
    """The strict schemas are no formality: a misspelt probe and a port given as a string fail."""
    deployment = resources()["Deployment"]
    typo = copy.deepcopy(deployment)
    container_of(typo)["readinesProbe"] = container_of(typo).pop("readinessProbe")
    wrong_type = copy.deepcopy(deployment)
    container_of(wrong_type)["ports"][0]["containerPort"] = "8000"
    for bad in (typo, wrong_type):
        with pytest.raises(kubernetes_validate.ValidationError):
            kube_validate(bad, KUBERNETES_VERSIONS[-1])


def test_the_kustomization_lists_every_manifest_of_its_folder():
    (kustomization,) = documents(BASE / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in BASE.glob("*.yaml") if p.name != "kustomization.yaml"
    )
    # deploy/k8s is the base (the base has a folder of its own: kustomize refuses an overlay
    # inside the folder of its base)
    (top,) = documents(K8S / "kustomization.yaml")
    assert top["resources"] == ["base"] and set(top) == {"apiVersion", "kind", "resources"}


def test_every_yaml_file_under_deploy_is_checked():
    """A resource, a kustomization, or a patch the overlay applies: nothing escapes the tests."""
    patches = {path for path, _ in overlay_patches()}
    kustomizations = set(DEPLOY.rglob("kustomization.yaml"))
    assert kustomizations == {K8S / "kustomization.yaml", BASE / "kustomization.yaml", OVERLAY / "kustomization.yaml"}
    assert set(DEPLOY.rglob("*.yaml")) == set(MANIFESTS) | kustomizations | patches


# -- kustomize ----------------------------------------------------------------------------------


def test_the_base_renders_with_kustomize_and_validates():
    rendered = render(K8S)
    assert rendered == render(BASE)
    assert sorted(d["kind"] for d in rendered) == BASE_KINDS
    for doc in rendered:
        for version in KUBERNETES_VERSIONS:
            kube_validate(doc, version)
    (deployment,) = (d for d in rendered if d["kind"] == "Deployment")
    assert container_of(deployment)["image"] == "muse:0.1.0"


def test_an_overlay_fills_the_secret_and_adds_flags_as_deploy_readme_says(tmp_path):
    """The overlay deploy/README.md shows: the Secret keeps the name the Deployment refers to."""
    shutil.copytree(K8S, tmp_path / "base")  # deploy/k8s, as the overlay names it
    overlay = tmp_path / "production"
    overlay.mkdir()
    (overlay / "object-store.env").write_text("AWS_ACCESS_KEY_ID=AKIAEXAMPLE\nAWS_SECRET_ACCESS_KEY=example\n")
    text = (DEPLOY / "README.md").read_text()
    (block,) = re.findall(r"```yaml\n(# production/kustomization\.yaml.*?)```", text, re.S)
    (overlay / "kustomization.yaml").write_text(block.replace("../deploy/k8s", "../base"))
    rendered = render(overlay)
    kinds = {d["kind"]: d for d in rendered}
    secret, deployment = kinds["Secret"], kinds["Deployment"]
    assert secret["metadata"]["name"] == "muse-object-store"
    assert set(secret["data"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    container = container_of(deployment)
    assert {e["valueFrom"]["secretKeyRef"]["name"] for e in container["env"]} == {"muse-object-store"}
    assert "--access-log" in container["args"]
    assert container["image"].endswith("/muse:0.1.0")
    assert {d["metadata"].get("namespace") for d in rendered} == {"scoring"}
    settings = kinds["ConfigMap"]["data"]
    build_parser().parse_args(["serve", *expanded_args(container, settings)])
    for doc in rendered:
        kube_validate(doc, KUBERNETES_VERSIONS[-1])


# -- the Deployment against the server ----------------------------------------------------------


def test_probes_are_the_servers_public_health_endpoints_on_its_port():
    found = resources()
    deployment, service, settings = found["Deployment"], found["Service"], found["ConfigMap"]["data"]
    container = container_of(deployment)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    public_gets = {e.path for e in ROUTES.endpoints if e.method == "GET" and e.public}
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/v2/health/ready"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/v2/health/live"
    for probe in probes.values():
        assert probe["path"] in public_gets  # answered without a key
        assert ports[probe["port"]] == 8000

    args = build_parser().parse_args(["serve", *expanded_args(container, settings)])
    assert args.port == ports["http"] == build_parser().parse_args(["serve", "--registry", "R"]).port
    assert args.host == "0.0.0.0"
    (service_port,) = service["spec"]["ports"]
    assert service_port["targetPort"] == "http"
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(args.port)


def test_the_health_endpoints_answer_as_the_probes_expect(tmp_path):
    """Live is 200 whatever is deployed; ready is 503 (not ready, no restart) until a deployment
    is loaded.  (tests/test_server.py covers ready's 200 with a generation.)"""

    async def run() -> list[tuple[int, bytes]]:
        app = MuseApp(Settings(registry=str(tmp_path), poll_interval=3600))
        async with ASGIClient(app) as client:
            answers = [await client.request("GET", path) for path in ("/v2/health/live", "/v2/health/ready")]
        return [(status, body) for status, body, _ in answers]

    (live, live_body), (ready, ready_body) = asyncio.run(run())
    assert (live, json.loads(live_body)) == (200, {"live": True})
    assert ready == 503 and b"no deployment" in ready_body


def test_the_arguments_are_serve_flags_with_values_from_the_configmap():
    found = resources()
    container, settings = container_of(found["Deployment"]), found["ConfigMap"]["data"]
    args = build_parser().parse_args(["serve", *expanded_args(container, settings)])
    assert args.registry == settings["MUSE_REGISTRY"]
    assert args.workers == int(settings["MUSE_WORKERS"]) == int(container["resources"]["requests"]["cpu"])
    assert container["envFrom"] == [{"configMapRef": {"name": found["ConfigMap"]["metadata"]["name"]}}]
    unused = {k for k in settings if not any(f"$({k})" in a for a in container["args"])}
    assert not unused, f"ConfigMap settings no flag uses: {unused}"


def test_everything_the_server_writes_is_on_a_writable_volume():
    """A read-only root: the registry (the score log's default home, the admin API), the score
    log, and /tmp (the multiprocess metrics directory `muse serve` makes there and Numba's cache,
    NUMBA_CACHE_DIR in the image: without it the server fails at import)."""
    found = resources()
    deployment, settings = found["Deployment"], found["ConfigMap"]["data"]
    pod = deployment["spec"]["template"]["spec"]
    container = container_of(deployment)
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    image_env = dict(
        kv.split("=", 1) for op, rest in stages(CONTAINERFILE)["runtime"] if op == "ENV" for kv in shlex.split(rest)
    )
    writes = [settings["MUSE_REGISTRY"], settings["MUSE_SCORE_LOG"], "/tmp", image_env["NUMBA_CACHE_DIR"]]
    for path in writes:
        mount = next((m for p, m in mounts.items() if path == p or path.startswith(p + "/")), None)
        assert mount is not None, f"{path} is on the read-only root"
        assert not mount.get("readOnly", False), path
        assert mount["name"] in volumes
    claim = found["PersistentVolumeClaim"]["metadata"]["name"]
    assert volumes["registry"]["persistentVolumeClaim"]["claimName"] == claim
    # the score log is cut below its emptyDir's size limit, which evicts the pod when exceeded
    assert volumes["scorelog"]["emptyDir"]["sizeLimit"] == "1Gi"
    assert int(settings["MUSE_SCORE_LOG_MAX_MB"]) < 1024


def test_the_container_runs_as_the_images_non_root_user_with_nothing_to_escalate():
    deployment = resources()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    container = container_of(deployment)
    (user,) = [rest for op, rest in stages(CONTAINERFILE)["runtime"] if op == "USER"]
    uid, gid = (int(x) for x in user.split(":"))
    assert uid != 0 and gid != 0
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (pod["securityContext"]["runAsUser"], pod["securityContext"]["runAsGroup"]) == (uid, gid)
    assert pod["securityContext"]["fsGroup"] == gid
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True and sc["capabilities"] == {"drop": ["ALL"]}


def test_the_grace_period_covers_the_prestop_sleep_and_a_request_in_flight():
    """On SIGTERM the server refuses new connections at once and finishes those in flight, the
    slowest of which may take --body-timeout to arrive, then flushes its score log."""
    found = resources()
    deployment, settings = found["Deployment"], found["ConfigMap"]["data"]
    pod = deployment["spec"]["template"]["spec"]
    command = container_of(deployment)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = int(command[1])
    assert pre_stop >= 5  # endpoint removal reaching kube-proxy and load balancers
    flush_margin = 5
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + float(settings["MUSE_BODY_TIMEOUT"]) + flush_margin
    isvc = found["InferenceService"]["spec"]["predictor"]
    assert isvc["terminationGracePeriodSeconds"] == pod["terminationGracePeriodSeconds"]
    assert isvc["model"]["lifecycle"] == container_of(deployment)["lifecycle"]


def test_autoscaler_budget_and_service_select_the_deployment():
    found = resources()
    deployment, hpa, pdb = found["Deployment"], found["HorizontalPodAutoscaler"], found["PodDisruptionBudget"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert "replicas" not in deployment["spec"]  # the autoscaler owns it
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "muse"}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    assert hpa["spec"]["minReplicas"] >= 2
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_the_object_store_credentials_come_from_the_secret_which_ships_empty():
    found = resources()
    secret = found["Secret"]
    assert not secret.get("data") and not secret.get("stringData"), "no credentials in the repository"
    names = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION"]
    for container in (container_of(found["Deployment"]), found["ClusterServingRuntime"]["spec"]["containers"][0]):
        env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
        assert sorted(env) == sorted(names)
        for name, ref in env.items():
            assert ref == {"name": secret["metadata"]["name"], "key": name, "optional": True}


# -- the object-store overlay (deploy/k8s/object-store) -----------------------------------------

OVERLAY_KINDS = sorted(k for k in BASE_KINDS if k != "PersistentVolumeClaim")
# Kubernetes' patch merge keys of the lists the overlay's patches touch; any other list in a
# patch replaces the base's, as in a strategic merge.
MERGE_KEYS = {"containers": "name", "volumes": "name", "volumeMounts": "mountPath", "env": "name"}
DIRECTIVE = "$patch"
# k8s.io/apimachinery/pkg/util/rand: the characters of generated names (no vowels, no 0, 1, 3).
NAME_CHARS = "bcdfghjklmnpqrstvwxz2456789"


def overlay_kustomization() -> dict[str, Any]:
    (kustomization,) = documents(OVERLAY / "kustomization.yaml")
    return kustomization


def overlay_patches() -> list[tuple[pathlib.Path, dict[str, Any]]]:
    """The overlay's patch files, in its order, each one document."""
    out = []
    for entry in overlay_kustomization()["patches"]:
        assert set(entry) == {"path"}, f"{entry}: a patch file, so that the static build below applies it"
        path = OVERLAY / entry["path"]
        (patch,) = documents(path)
        out.append((path, patch))
    return out


def strategic_merge(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """``patch`` merged into ``base`` as kustomize merges a strategic-merge patch, for what the
    overlay uses: maps merge, the lists of MERGE_KEYS merge by key (an item with `$patch: delete`
    removes its namesake, new items go first, in the patch's order, as kustomize puts them),
    null removes a field, anything else replaces."""
    out = copy.deepcopy(base)
    for key, value in patch.items():
        if key == DIRECTIVE:
            continue
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = strategic_merge(out[key], value)
        elif isinstance(value, list) and key in MERGE_KEYS:
            out[key] = _merge_list(out.get(key, []), value, MERGE_KEYS[key])
        else:
            out[key] = copy.deepcopy(value)
    return out


def _merge_list(base: list[dict[str, Any]], patch: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    items, added = copy.deepcopy(base), []
    for item in patch:
        at = next((i for i, b in enumerate(items) if b[key] == item[key]), None)
        if item.get(DIRECTIVE) == "delete":
            assert at is not None, f"{key} {item[key]!r}: the base has none to delete"
            del items[at]
        elif at is None:
            added.append(strategic_merge({}, item))
        else:
            items[at] = strategic_merge(items[at], item)
    return added + items


def without_directives(value: Any) -> Any:
    """A patch as the resource fragment it adds: `$patch` keys and deleted items dropped."""
    if isinstance(value, dict):
        return {k: without_directives(v) for k, v in value.items() if k != DIRECTIVE}
    if isinstance(value, list):
        return [without_directives(v) for v in value if not (isinstance(v, dict) and v.get(DIRECTIVE) == "delete")]
    return value


def base_resources() -> list[dict[str, Any]]:
    (kustomization,) = documents(BASE / "kustomization.yaml")
    return [doc for name in kustomization["resources"] for doc in documents(BASE / name)]


def overlay_static() -> list[dict[str, Any]]:
    """The overlay as kustomize builds it, without kustomize: the base's resources, its image
    tag, and the overlay's patches."""
    kustomization = overlay_kustomization()
    assert set(kustomization) == {"apiVersion", "kind", "resources", "patches"}, "more than this function applies"
    assert kustomization["resources"] == ["../base"]
    docs = base_resources()
    (base_kustomization,) = documents(BASE / "kustomization.yaml")
    for image in base_kustomization["images"]:
        for doc in docs:
            for container in doc["spec"]["template"]["spec"]["containers"] if doc["kind"] == "Deployment" else ():
                if container["image"] == image["name"]:
                    container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    for path, patch in overlay_patches():
        found = [
            i
            for i, d in enumerate(docs)
            if (d["kind"], d["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"])
        ]
        assert len(found) == 1, f"{path}: patches no resource of the base"
        (i,) = found
        assert docs[i]["apiVersion"] == patch["apiVersion"], path
        if patch.get(DIRECTIVE) == "delete":
            del docs[i]
        else:
            docs[i] = strategic_merge(docs[i], patch)
    return docs


@pytest.fixture(params=["kustomize", "static"])
def overlay(request) -> dict[str, dict[str, Any]]:
    """kind -> resource of the overlay, built by kustomize (skipped without it) or by this file."""
    docs = render(OVERLAY) if request.param == "kustomize" else overlay_static()
    assert sorted(d["kind"] for d in docs) == OVERLAY_KINDS
    return {d["kind"]: d for d in docs}


def serve_args(found: dict[str, dict[str, Any]]) -> Any:
    return build_parser().parse_args(
        ["serve", *expanded_args(container_of(found["Deployment"]), found["ConfigMap"]["data"])]
    )


def mount_for(path: str, container: dict[str, Any]) -> dict[str, Any] | None:
    """The volume mount ``path`` is on (the deepest), or None: the read-only root."""
    mounts = [m for m in container["volumeMounts"] if path == m["mountPath"] or path.startswith(m["mountPath"] + "/")]
    return max(mounts, key=lambda m: len(m["mountPath"]), default=None)


def quantity(text: str) -> int:
    """Bytes of a Kubernetes quantity in the binary units these manifests use."""
    number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", text).groups()  # type: ignore[union-attr]
    return int(number) << {None: 0, "Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40}[unit]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_overlay_builds_and_every_resource_validates(overlay, version):
    for doc in overlay.values():
        kube_validate(doc, version)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_overlays_patches_validate_as_far_as_a_patch_can(version):
    """What each patch adds, validated strictly on its own: the ConfigMap whole, the PVC's
    deletion as a PersistentVolumeClaim, the Deployment's pod template as a PodSpec (a patch
    lacks the selector and the image a whole Deployment needs)."""
    kinds = []
    for path, patch in overlay_patches():
        kinds.append(patch["kind"])
        fragment = without_directives(patch)
        if patch["kind"] == "Deployment":
            assert set(fragment["spec"]) == {"template"}, path
            schema_of("podspec-v1", version).validate(fragment["spec"]["template"]["spec"])
        else:
            kube_validate(fragment, version)
    assert sorted(kinds) == ["ConfigMap", "Deployment", "PersistentVolumeClaim"]


def test_the_static_build_is_what_kustomize_builds():
    """So the static build stands for kustomize's where kustomize is missing."""
    rendered = render(OVERLAY)
    static = overlay_static()
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(rendered, key=key) == sorted(static, key=key)


def test_the_overlay_serves_an_s3_registry_the_object_store_client_accepts(overlay):
    args = serve_args(overlay)
    registry = overlay["ConfigMap"]["data"]["MUSE_REGISTRY"]
    assert args.registry == registry and is_url(registry)
    scheme, bucket, prefix = objectstore.parse_url(registry)
    assert (scheme, bucket, prefix) == ("s3", "muse-registry", "prod")
    assert args.replica_id is None  # MUSE_REPLICA_ID decides (below)
    # the placeholder is documented as the thing to change
    assert registry in (OVERLAY / "settings.yaml").read_text() and "CHANGE" in (OVERLAY / "settings.yaml").read_text()
    assert "s3://muse-registry/prod" in (DEPLOY / "README.md").read_text()


def test_the_overlay_has_no_registry_volume(overlay):
    pod = overlay["Deployment"]["spec"]["template"]["spec"]
    assert "PersistentVolumeClaim" not in overlay
    assert not [v for v in pod["volumes"] if set(v) - {"name", "emptyDir"}], "only emptyDirs"
    assert mount_for("/registry", container_of(overlay["Deployment"])) is None
    assert "registry" not in {v["name"] for v in pod["volumes"]}


def test_the_mirror_is_in_a_mounted_writable_cache(overlay, monkeypatch):
    """MUSE_CACHE_DIR is where the server keeps its mirror (core/remote.py cache_root); with it,
    everything the server writes is on a writable volume of the pod's own."""
    deployment = overlay["Deployment"]
    pod, container = deployment["spec"]["template"]["spec"], container_of(deployment)
    env = {e["name"]: e for e in container["env"]}
    cache = env["MUSE_CACHE_DIR"]["value"]
    monkeypatch.setenv("MUSE_CACHE_DIR", cache)
    mirrors = remote.cache_root()
    volumes = {v["name"]: v for v in pod["volumes"]}
    mount = mount_for(str(mirrors), container)
    assert mount is not None and mount["mountPath"] == cache, f"{mirrors} is on the read-only root"
    assert not mount.get("readOnly", False)
    assert volumes[mount["name"]]["emptyDir"] == {
        "sizeLimit": "2Gi"
    }  # the registry's size (object-store/deployment.yaml)
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    image_env = dict(
        kv.split("=", 1) for op, rest in stages(CONTAINERFILE)["runtime"] if op == "ENV" for kv in shlex.split(rest)
    )
    for path in (str(mirrors), serve_args(overlay).score_log, "/tmp", image_env["NUMBA_CACHE_DIR"]):
        mount = mount_for(path, container)
        assert mount is not None and not mount.get("readOnly", False), f"{path} is not writable"
        assert "emptyDir" in volumes[mount["name"]], path


def test_the_score_log_is_each_pods_own_empty_dir(overlay, monkeypatch):
    """Every replica uploads and deletes every file of its score-log directory: never shared."""
    deployment, settings = overlay["Deployment"], overlay["ConfigMap"]["data"]
    pod, container = deployment["spec"]["template"]["spec"], container_of(deployment)
    env = {e["name"]: e for e in container["env"]}
    monkeypatch.setenv("MUSE_CACHE_DIR", env["MUSE_CACHE_DIR"]["value"])  # the pod's cache, not this host's
    score_log = serve_args(overlay).score_log
    mount = mount_for(score_log, container)
    assert mount is not None and mount["mountPath"] == score_log
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert set(volume) == {"name", "emptyDir"}
    mirrors = mount_for(str(remote.cache_root()), container)
    assert mirrors is not None and mount_for(score_log, container) != mirrors
    assert int(settings["MUSE_SCORE_LOG_MAX_MB"]) << 20 < quantity(volume["emptyDir"]["sizeLimit"])


def pod_name(deployment: str, rng: random.Random) -> str:
    """A name Kubernetes gives a pod of ``deployment``: its ReplicaSet is DEPLOYMENT-HASH (the
    pod template's hash, up to 10 characters), whose pods are generated from `RS-` cut to 58
    characters plus 5 random ones (apiserver names.SimpleNameGenerator)."""
    template_hash = "".join(rng.choice(NAME_CHARS) for _ in range(rng.randint(1, 10)))
    return f"{deployment}-{template_hash}-"[:58] + "".join(rng.choice(NAME_CHARS) for _ in range(5))


def test_the_replica_id_is_the_pod_name_which_the_server_accepts(overlay, monkeypatch):
    container = container_of(overlay["Deployment"])
    env = {e["name"]: e for e in container["env"]}
    assert env["MUSE_REPLICA_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    given = serve_args(overlay).replica_id  # None: no --replica-id, so the variable decides
    rng = random.Random(18)
    # this Deployment's pods, and those of the longest and of dotted names a Deployment may have
    for deployment in [overlay["Deployment"]["metadata"]["name"], "a" * 253, "scoring.muse-v2." + "b" * 200]:
        for _ in range(200):
            name = pod_name(deployment, rng)
            monkeypatch.setenv("MUSE_REPLICA_ID", name)
            assert replica.replica_id(given) == name
    monkeypatch.setenv("MUSE_REPLICA_ID", "a" * 64)  # uncut, a long name would be refused
    with pytest.raises(ValueError):
        replica.replica_id(given)


def test_the_overlays_grace_period_covers_the_score_logs_last_upload(overlay):
    """After the base's preStop, body timeout and flush, the last upload runs once the workers
    have exited: a PUT per file left (a worker's last flush, and at most one written since the
    previous pass, uploads being more frequent than flushes), with time for the client's
    retries of one failing PUT."""
    deployment, settings = overlay["Deployment"], overlay["ConfigMap"]["data"]
    pod = deployment["spec"]["template"]["spec"]
    (pre_stop,) = [int(x) for x in container_of(deployment)["lifecycle"]["preStop"]["exec"]["command"][1:]]
    assert float(settings["MUSE_SCORE_LOG_FLUSH_SECONDS"]) >= replica.UPLOAD_EVERY  # one file a worker at most
    files_left = 2 * int(settings["MUSE_WORKERS"])
    per_put = 1.0  # a score-log file within the store's region
    retries = objectstore._RETRY["retry_timeout"].total_seconds()
    flush_margin = 5
    last_upload = files_left * per_put + retries
    needed = pre_stop + float(settings["MUSE_BODY_TIMEOUT"]) + flush_margin + last_upload
    assert pod["terminationGracePeriodSeconds"] >= needed
    assert (
        pod["terminationGracePeriodSeconds"]
        > resources()["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    )


def test_the_overlay_keeps_the_bases_security_probes_and_serving(overlay):
    base = resources()["Deployment"]
    deployment = overlay["Deployment"]
    pod, base_pod = deployment["spec"]["template"]["spec"], base["spec"]["template"]["spec"]
    container, base_container = container_of(deployment), container_of(base)
    assert pod["securityContext"] == base_pod["securityContext"] and pod["securityContext"]["runAsNonRoot"] is True
    assert pod["automountServiceAccountToken"] is False
    same = [
        "securityContext",
        "startupProbe",
        "readinessProbe",
        "livenessProbe",
        "lifecycle",
        "ports",
        "args",
        "envFrom",
    ]
    for field in same:
        assert container[field] == base_container[field], field
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"]["requests"]["cpu"] == base_container["resources"]["requests"]["cpu"]
    assert container["resources"]["limits"]["memory"] == base_container["resources"]["limits"]["memory"]
    credentials = [e for e in container["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    assert credentials == [e for e in base_container["env"] if "secretKeyRef" in e.get("valueFrom", {})]
    assert deployment["spec"]["selector"] == base["spec"]["selector"]


@pytest.mark.parametrize("which", ["base", "overlay"])
def test_ephemeral_storage_covers_every_empty_dir(which):
    """The kubelet evicts a pod whose emptyDirs (and logs) exceed the sum of its containers'
    ephemeral-storage limits, before any sizeLimit is reached if the limit is the smaller."""
    deployment = (
        resources()["Deployment"] if which == "base" else {d["kind"]: d for d in overlay_static()}["Deployment"]
    )
    pod, container = deployment["spec"]["template"]["spec"], container_of(deployment)
    empty_dirs = sum(quantity(v["emptyDir"]["sizeLimit"]) for v in pod["volumes"] if "emptyDir" in v)
    limit = quantity(container["resources"]["limits"]["ephemeral-storage"])
    assert empty_dirs <= limit
    assert quantity(container["resources"]["requests"]["ephemeral-storage"]) <= limit


def test_an_overlay_of_the_object_store_overlay_as_deploy_readme_says(tmp_path):
    """deploy/README.md's production overlay: its bucket, its credentials, the Secret's name kept."""
    shutil.copytree(K8S, tmp_path / "k8s")
    overlay = tmp_path / "production-s3"
    overlay.mkdir()
    (overlay / "object-store.env").write_text(
        "AWS_ACCESS_KEY_ID=AKIAEXAMPLE\nAWS_SECRET_ACCESS_KEY=example\nAWS_REGION=eu-west-1\n"
    )
    text = (DEPLOY / "README.md").read_text()
    (block,) = re.findall(r"```yaml\n(# production-s3/kustomization\.yaml.*?)```", text, re.S)
    (overlay / "kustomization.yaml").write_text(block.replace("../deploy/k8s/object-store", "../k8s/object-store"))
    rendered = render(overlay)
    kinds = {d["kind"]: d for d in rendered}
    assert sorted(kinds) == OVERLAY_KINDS
    assert set(kinds["Secret"]["data"]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"}
    assert kinds["Secret"]["metadata"]["name"] == "muse-object-store"
    args = serve_args(kinds)
    assert objectstore.parse_url(args.registry) == ("s3", "acme-scoring", "muse")
    assert container_of(kinds["Deployment"])["image"] == "registry.example.internal/muse:0.1.0"
    assert {d["metadata"].get("namespace") for d in rendered} == {"scoring"}
    for doc in rendered:
        kube_validate(doc, KUBERNETES_VERSIONS[-1])


# -- KServe -------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kserve_runtime_fields_exist_in_kserves_crd_and_its_containers_validate(version):
    runtime = resources()["ClusterServingRuntime"]
    assert runtime["apiVersion"] == f"{KSERVE_GROUP}/v1alpha1"
    assert "namespace" not in runtime["metadata"]  # cluster-scoped
    jsonschema.validate(runtime["spec"], SERVING_RUNTIME)
    for container in runtime["spec"]["containers"]:
        schema_of("container-v1", version).validate(container)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_kserve_inferenceservice_fields_exist_in_kserves_crd(version):
    found = resources()
    isvc, runtime = found["InferenceService"], found["ClusterServingRuntime"]
    assert isvc["apiVersion"] == f"{KSERVE_GROUP}/v1beta1"
    assert set(isvc["spec"]) == {"predictor"}
    predictor = dict(isvc["spec"]["predictor"])
    model = predictor.pop("model")
    own = {k: predictor.pop(k) for k in list(predictor) if k in PREDICTOR_OWN}
    jsonschema.validate(own, {"type": "object", "properties": PREDICTOR_OWN})
    schema_of("podspec-v1", version).validate({"containers": [], **predictor})  # the inline PodSpec
    jsonschema.validate(model, MODEL_OWN)
    container = {k: v for k, v in model.items() if k not in MODEL_OWN["properties"]}
    schema_of("container-v1", version).validate({"name": "kserve-container", **container})
    # it selects the runtime, which serves its format and protocol
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"] in [
        {k: f[k] for k in ("name", "version")} for f in runtime["spec"]["supportedModelFormats"]
    ]
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"]
    assert model["storageUri"] == f"pvc://{found['PersistentVolumeClaim']['metadata']['name']}"


def test_kserve_runtime_serves_the_open_inference_protocol_on_kserves_port():
    runtime = resources()["ClusterServingRuntime"]
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    args = build_parser().parse_args(["serve", *container["args"]])
    assert (args.host, args.port, args.registry) == ("0.0.0.0", 8080, "/mnt/models")  # KServe's port and mount
    assert [p["containerPort"] for p in container["ports"]] == [8080]
    assert runtime["spec"]["protocolVersions"] == ["v2"]
    paths = {e.path for e in ROUTES.endpoints}
    assert {"/v2/models/{intent}/infer", "/v2/health/live", "/v2/health/ready"} <= paths
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    assert container["securityContext"]["runAsNonRoot"] is True and container["securityContext"]["runAsUser"] != 0
    assert args.score_log.startswith("/tmp/")  # /mnt/models is mounted read-only


# -- the Containerfile --------------------------------------------------------------------------


def test_containerfile_builds_in_stages_and_serves_without_a_compiler():
    found = stages(CONTAINERFILE)
    assert list(found) == ["build", "compile", "runtime"]  # runtime last: the default target
    assert found["build"][0] == ("FROM", "${BASE_IMAGE} AS build")
    assert found["compile"][0] == ("FROM", "build AS compile")
    assert found["runtime"][0] == ("FROM", "${BASE_IMAGE} AS runtime")
    build_runs = " ".join(rest for op, rest in found["build"] if op == "RUN")
    assert "gcc" in build_runs and "pip wheel" in build_runs
    runtime_runs = " ".join(rest for op, rest in found["runtime"] if op == "RUN")
    assert "gcc" not in runtime_runs and "-dev" not in runtime_runs
    assert ("COPY", "--from=build /opt/muse /opt/muse") in found["runtime"]


def test_containerfile_runtime_is_non_root_health_checked_and_runs_muse_serve():
    runtime = dict(stages(CONTAINERFILE)["runtime"])  # the last of each instruction
    compile_user = dict(stages(CONTAINERFILE)["compile"])["USER"]
    for user in (runtime["USER"], compile_user):
        uid, gid = user.split(":")
        assert uid.isdigit() and int(uid) != 0 and int(gid) != 0  # numeric: runAsNonRoot can check it
    assert json.loads(runtime["ENTRYPOINT"]) == ["muse", "serve"]
    cmd = json.loads(runtime["CMD"])
    args = build_parser().parse_args(["serve", *cmd])
    assert (args.registry, args.host) == ("/registry", "0.0.0.0")
    assert runtime["EXPOSE"] == str(args.port)
    assert json.loads(runtime["VOLUME"]) == ["/registry"]
    assert f"http://127.0.0.1:{args.port}/v2/health/ready" in runtime["HEALTHCHECK"]
    assert runtime["HEALTHCHECK"].split("CMD", 1)[0].split()  # interval and friends set


def test_containerfile_holds_no_secret():
    pattern = re.compile(r"(PASSWORD|SECRET|TOKEN|ACCESS_KEY|CREDENTIAL)", re.I)
    for op, rest in instructions(CONTAINERFILE):
        if op in ("ENV", "ARG", "LABEL"):
            assert not pattern.search(rest), f"{op} {rest}"
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "**/*.so"} <= set(ignored)
