"""The container image and the Kubernetes and KServe manifests (Containerfile, deploy/).

Every manifest parses and the Kubernetes resources validate, strictly (no unknown field),
against the JSON schemas of the oldest and newest Kubernetes versions we claim, bundled in
kubernetes-validate (offline).  KServe's custom resources have no bundled schema: their own
fields are checked against KServe's CRDs (below) and the Kubernetes types they embed
(Container, PodSpec) against Kubernetes' schemas.  The base is rendered with kustomize when a
kustomize binary (or kubectl's built-in) is on PATH.  The Deployment is held to what the
server does: its probe paths are the server's public health endpoints and answer as the
probes expect, its arguments parse with `muse serve`'s own parser, its port is the one the
image and the Service use, and everything the server writes is on a writable volume."""

from __future__ import annotations

import asyncio
import copy
import functools
import importlib.resources
import json
import pathlib
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

from muse.server.app import ROUTES, MuseApp
from muse.server.cli import build_parser
from muse.server.settings import Settings
from muse.server.testing import ASGIClient

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
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


MANIFESTS = sorted(p for p in DEPLOY.rglob("*.yaml") if p.name != "kustomization.yaml")


def resources() -> dict[str, dict[str, Any]]:
    """kind -> the one resource of that kind in deploy/k8s and deploy/kserve."""
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
    (kustomization,) = documents(K8S / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"
    )


# -- kustomize ----------------------------------------------------------------------------------


def test_the_base_renders_with_kustomize_and_validates():
    rendered = render(K8S)
    assert sorted(d["kind"] for d in rendered) == BASE_KINDS
    for doc in rendered:
        for version in KUBERNETES_VERSIONS:
            kube_validate(doc, version)
    (deployment,) = (d for d in rendered if d["kind"] == "Deployment")
    assert container_of(deployment)["image"] == "muse:0.1.0"


def test_an_overlay_fills_the_secret_and_adds_flags_as_deploy_readme_says(tmp_path):
    """The overlay deploy/README.md shows: the Secret keeps the name the Deployment refers to."""
    shutil.copytree(K8S, tmp_path / "base")
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
