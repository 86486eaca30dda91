"""The Kubernetes manifests in deploy/kubernetes: schema, wiring to the server, kustomize layout.

No cluster here, so nothing is applied. (a) Every document of every YAML file validates against the
Kubernetes OpenAPI schemas that kubernetes-validate bundles (the test extra), strict: an unknown or
misspelt field fails. (b) What a schema cannot see: probes on the routes server/routes/health.py
serves, selectors that match, env names that are real settings, metric names the server exports,
each variant as `kubectl kustomize` (offline, client side) renders it, the GPU overlay merged onto
the base by kustomize itself. (c) Every kustomization names files that exist and renders every
object it lists. Without kubectl, the rendered checks skip and say so.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
# The schema version checked against. A floor, not the newest: managed clusters (EKS, GKE, AKS) all
# still offer 1.33, and every field used here is GA there. kubernetes-validate bundles 1.25 onwards.
KUBERNETES_VERSION = "1.33"
KUSTOMIZATION_NAMES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
# CRDs have no schema in kubernetes-validate (it bundles the core API's); these alone are skipped.
NO_SCHEMA = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "prometheus-operator CRD: kubernetes-validate bundles "
    "only the core Kubernetes API schemas (its selector and port are checked below)",
}
QUANTITY = re.compile(r"^([0-9]+(\.[0-9]+)?|\.[0-9]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
SUFFIX = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def rel(path: Path) -> str:
    return str(path.relative_to(K8S))


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kustomization_dirs() -> list[Path]:
    return sorted({path.parent for name in KUSTOMIZATION_NAMES for path in K8S.rglob(name)})


def manifest_files() -> list[Path]:
    files = sorted(path for ext in ("*.yaml", "*.yml") for path in K8S.rglob(ext))
    return [path for path in files if path.name not in KUSTOMIZATION_NAMES]


MANIFESTS = manifest_files()


def objects(directory: str) -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> object, over the plain manifests of one directory (a base or an overlay's patches)."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted((K8S / directory).glob("*.yaml")):
        if path.name not in KUSTOMIZATION_NAMES:
            for doc in documents(path):
                found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


KUBECTL = shutil.which("kubectl")


@cache
def kustomized(directory: str) -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> object, as `kubectl kustomize` (offline, client side) renders the directory:
    the real strategic merge, not one of our own."""
    if KUBECTL is None:
        pytest.skip("kubectl is not installed: the overlays cannot be rendered (the per-file schema checks still ran)")
    result = subprocess.run([KUBECTL, "kustomize", str(K8S / directory)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(result.stdout) if d}


VARIANTS = {"cpu": "base", "gpu": "gpu"}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> tuple[str, dict[tuple[str, str], dict[str, Any]]]:
    return request.param, kustomized(VARIANTS[request.param])


def pod_spec(objs: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    return objs[("Deployment", "gemserve")]["spec"]["template"]["spec"]


def server_container(objs: dict[tuple[str, str], dict[str, Any]]) -> dict[str, Any]:
    (container,) = [c for c in pod_spec(objs)["containers"] if c["name"] == "gemserve"]
    return container


def effective_env(objs: dict[tuple[str, str], dict[str, Any]], container: dict[str, Any]) -> dict[str, Any]:
    """Name -> value (or valueFrom) as the container sees it: envFrom ConfigMaps, then env on top."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        assert ("ConfigMap", ref) in objs, f"envFrom names ConfigMap {ref}, which is not among the manifests"
        env.update(objs[("ConfigMap", ref)]["data"])
    for item in container.get("env", []):
        env[item["name"]] = item.get("value", item.get("valueFrom"))
    return env


def quantity(value: str | int) -> float:
    text = str(value)
    match = QUANTITY.match(text)
    assert match, f"not a Kubernetes quantity: {text!r}"
    return float(match.group(1)) * SUFFIX.get(match.group(3) or "", 1)


def dockerfile_env(dockerfile: str, name: str) -> str:
    found = re.findall(rf"\b{name}=(\S+)", (ROOT / "docker" / dockerfile).read_text())
    assert found, f"{name} not set in docker/{dockerfile}"
    return found[-1]


def dockerfile_uid(dockerfile: str) -> int:
    users = re.findall(r"^USER\s+(\d+)", (ROOT / "docker" / dockerfile).read_text(), re.M)
    assert users, f"no numeric USER in docker/{dockerfile}"
    return int(users[-1])


def exported_metrics() -> dict[str, str]:
    """Metric family name -> type, of everything the server's registry exports."""
    from server.metrics import ServerMetrics

    return {family.name: family.type for family in ServerMetrics().registry.collect()}


@pytest.fixture(scope="module")
def setting_names() -> set[str]:
    """Every env var the server reads: Settings' fields (GEMSERVE_) and the vllm backend's (GEMSERVE_VLLM_)."""
    from server.engine.vllm_setup import VLLMSettings
    from server.settings import Settings

    names = {f"GEMSERVE_{field.upper()}" for field in Settings.model_fields}
    names |= {f"GEMSERVE_VLLM_{field.upper()}" for field in VLLMSettings.model_fields}
    return names


# ---- (a) schema -------------------------------------------------------------------------------


def test_there_are_manifests_for_every_object() -> None:
    kinds = {doc["kind"] for path in MANIFESTS for doc in documents(path)}
    wanted = {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget"}
    assert wanted <= kinds


@pytest.mark.parametrize("path", MANIFESTS, ids=rel)
def test_manifest_validates_against_the_kubernetes_schema(path: Path) -> None:
    docs = documents(path)
    assert docs, f"{rel(path)} holds no document"
    skipped = []
    for doc in docs:
        what = f"{rel(path)}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        reason = NO_SCHEMA.get((doc.get("apiVersion"), doc.get("kind")))
        if reason is not None:
            skipped.append(f"{what}: {reason}")
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            location = ".".join(str(part) for part in error.path)
            pytest.fail(f"{what} fails Kubernetes {error.version} schema at {location}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            pytest.fail(f"{what}: {error.message} (a CRD? add it to NO_SCHEMA with the reason)")
    if skipped:
        pytest.skip("schema not checked: " + "; ".join(skipped))


def test_each_variant_as_rendered_validates(variant: tuple[str, dict]) -> None:
    name, objs = variant
    for (kind, obj_name), obj in objs.items():
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name}: {kind}/{obj_name} at {'.'.join(map(str, error.path))}: {error.message}")


# ---- (b) semantics ------------------------------------------------------------------------------


def test_probes_hit_ready_and_health_on_the_served_port(variant: tuple[str, dict]) -> None:
    _, objs = variant
    container = server_container(objs)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports.get("http") == 8000
    expected = {"readinessProbe": "/ready", "livenessProbe": "/health", "startupProbe": "/health"}
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert ports.get(get["port"], get["port"]) == ports["http"], f"{probe} port {get['port']}"
    # Liveness must not kill a pod still starting: the startup probe allows at least the image's 180 s.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 180
    env = effective_env(objs, container)
    assert env["GEMSERVE_PORT"] == str(ports["http"]), "the server must listen on the probed port"
    assert env["GEMSERVE_HOST"] in ("0.0.0.0", "::"), "the kubelet probes the pod IP, not loopback"


def test_service_links_are_off(variant: tuple[str, dict]) -> None:
    """A Service named gemserve would set GEMSERVE_PORT=tcp://<ip>:8000 in every pod: not a port."""
    _, objs = variant
    assert pod_spec(objs)["enableServiceLinks"] is False


def test_every_gemserve_env_name_is_a_real_setting(variant: tuple[str, dict], setting_names: set[str]) -> None:
    _, objs = variant
    spec = pod_spec(objs)
    for container in spec["containers"] + spec.get("initContainers", []):
        used = {name for name in effective_env(objs, container) if name.startswith("GEMSERVE_")}
        unknown = used - setting_names
        assert not unknown, f"{container['name']}: not a setting in server/settings.py or vllm_setup.py: {unknown}"
    for obj in objs.values():
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"] == "gemserve-config":
            assert set(obj["data"]) <= setting_names, set(obj["data"]) - setting_names


def test_api_key_comes_from_an_optional_secret(variant: tuple[str, dict]) -> None:
    _, objs = variant
    (item,) = [e for e in server_container(objs)["env"] if e["name"] == "GEMSERVE_API_KEY"]
    ref = item["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True and ref["name"] and ref["key"]
    assert ("Secret", ref["name"]) not in objs, "no key may be committed: the Secret is created by hand"


def test_pod_runs_as_the_images_user_and_drains(variant: tuple[str, dict]) -> None:
    name, objs = variant
    dockerfile = {"cpu": "Dockerfile", "gpu": "Dockerfile.cuda"}[name]
    spec = pod_spec(objs)
    security = spec["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == dockerfile_uid(dockerfile)
    assert security["fsGroup"] == dockerfile_uid(dockerfile), "the cache volume must be writable by that user"
    for container in spec["containers"] + spec["initContainers"]:
        assert container["securityContext"]["allowPrivilegeEscalation"] is False, container["name"]
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], container["name"]
    # preStop sleep, then the server's drain (the vllm backend waits up to 60 s), inside the grace period.
    sleep = int(server_container(objs)["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] >= sleep + 60


def test_model_cache_volume_sits_where_the_image_keeps_it(variant: tuple[str, dict]) -> None:
    name, objs = variant
    cache_dir = dockerfile_env({"cpu": "Dockerfile", "gpu": "Dockerfile.cuda"}[name], "GEMSERVE_CACHE_DIR")
    spec = pod_spec(objs)
    mounts = {m["mountPath"]: m["name"] for m in server_container(objs)["volumeMounts"]}
    assert cache_dir in mounts, f"nothing mounted at GEMSERVE_CACHE_DIR={cache_dir}"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounts[cache_dir] in volumes
    # The volume hides the model the image converted at build: the init container copies it in.
    (seed,) = spec["initContainers"]
    assert seed["image"] == server_container(objs)["image"]
    (seed_mount,) = seed["volumeMounts"]
    assert seed_mount["name"] == mounts[cache_dir]
    assert f"{cache_dir}/." in " ".join(seed["command"]) and seed_mount["mountPath"] in " ".join(seed["command"])


def test_image_is_the_one_docker_builds(variant: tuple[str, dict]) -> None:
    name, objs = variant
    compose = yaml.safe_load((ROOT / "docker" / {"cpu": "compose.yaml", "gpu": "compose.gpu.yaml"}[name]).read_text())
    image = compose["services"]["gemserve"]["image"]
    image = re.sub(r"^\$\{\w+:?-(.*)\}$", r"\1", image)  # compose's ${VAR:-default}: the default
    assert image == {"cpu": "gemserve:cpu", "gpu": "gemserve:cuda"}[name]
    spec = pod_spec(objs)
    assert {c["image"] for c in spec["containers"] + spec["initContainers"]} == {image}


def test_resources_are_valid_quantities_with_requests_under_limits(variant: tuple[str, dict]) -> None:
    _, objs = variant
    spec = pod_spec(objs)
    for container in spec["containers"] + spec["initContainers"]:
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert {"cpu", "memory"} <= set(requests) and {"cpu", "memory"} <= set(limits), container["name"]
        for resource, limit in limits.items():
            assert quantity(requests.get(resource, limit)) <= quantity(limit), f"{container['name']} {resource}"
    # The embedded 135M model alone takes 1-1.5 GiB RSS.
    assert quantity(server_container(objs)["resources"]["requests"]["memory"]) >= 1.5 * 2**30


def test_service_selects_the_pods_and_targets_the_named_port() -> None:
    objs = objects("base")
    service = objs[("Service", "gemserve")]["spec"]
    deployment = objs[("Deployment", "gemserve")]["spec"]
    labels = deployment["template"]["metadata"]["labels"]
    assert deployment["selector"]["matchLabels"].items() <= labels.items()
    assert service["type"] == "ClusterIP"
    assert service["selector"] and service["selector"].items() <= labels.items()
    (port,) = service["ports"]
    assert port["port"] == 8000
    assert port["targetPort"] in {p["name"] for p in server_container(objs)["ports"]}


def test_pod_disruption_budget_selects_the_pods_and_never_blocks_a_drain(variant: tuple[str, dict]) -> None:
    _, objs = variant
    pdb = objs[("PodDisruptionBudget", "gemserve")]["spec"]
    labels = objs[("Deployment", "gemserve")]["spec"]["template"]["metadata"]["labels"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    hpa = objs[("HorizontalPodAutoscaler", "gemserve")]["spec"]
    if "minAvailable" in pdb:
        assert int(pdb["minAvailable"]) < hpa["minReplicas"]
    else:
        assert int(pdb["maxUnavailable"]) >= 1


def test_prometheus_scrape_annotations_name_the_metrics_port(variant: tuple[str, dict]) -> None:
    _, objs = variant
    annotations = objs[("Deployment", "gemserve")]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == server_container(objs)["ports"][0]["containerPort"]


def test_hpa_scales_the_deployment_on_an_exported_queue_gauge(variant: tuple[str, dict]) -> None:
    _, objs = variant
    hpa = objs[("HorizontalPodAutoscaler", "gemserve")]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gemserve"}
    assert ("Deployment", hpa["scaleTargetRef"]["name"]) in objs
    assert "replicas" not in objs[("Deployment", "gemserve")]["spec"], "the HPA owns the replica count"
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    exported = exported_metrics()
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "gemserve_requests_waiting"
    assert exported.get(name) == "gauge", f"{name} is not a gauge server/metrics.py exports"
    assert metric["pods"]["target"]["type"] == "AverageValue" and quantity(metric["pods"]["target"]["averageValue"])
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 60


def adapter_rules() -> list[dict[str, Any]]:
    (configmap,) = documents(K8S / "prometheus-adapter" / "rules-configmap.yaml")
    return yaml.safe_load(configmap["data"]["config.yaml"])["rules"]


def test_prometheus_adapter_rules_expose_exported_metrics_per_pod() -> None:
    exported = exported_metrics()
    served = set()
    for rule in adapter_rules():
        series = set(re.findall(r"\bgemserve_[a-z0-9_]+", rule["seriesQuery"]))
        assert series and series <= set(exported), f"seriesQuery names unknown metrics: {series - set(exported)}"
        (metric,) = series
        assert re.fullmatch(rule["name"]["matches"], metric), rule["name"]
        served.add(rule["name"].get("as") or metric)
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert placeholder in rule["metricsQuery"], placeholder
    assert {"gemserve_requests_waiting", "gemserve_requests_running"} <= served
    for name, directory in VARIANTS.items():
        for metric in kustomized(directory)[("HorizontalPodAutoscaler", "gemserve")]["spec"]["metrics"]:
            assert metric["pods"]["metric"]["name"] in served, f"{name}: the adapter does not serve the HPA's metric"


def test_servicemonitor_selects_the_service_port() -> None:
    (monitor,) = documents(K8S / "servicemonitor" / "servicemonitor.yaml")
    service = objects("base")[("Service", "gemserve")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in service["spec"]["ports"]}
    assert {e["path"] for e in monitor["spec"]["endpoints"]} == {"/metrics"}


def test_gpu_variant_requests_a_gpu_and_selects_vllm() -> None:
    objs = kustomized("gpu")
    spec = pod_spec(objs)
    container = server_container(objs)
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert int(limits["nvidia.com/gpu"]) == 1
    assert int(requests.get("nvidia.com/gpu", limits["nvidia.com/gpu"])) == int(limits["nvidia.com/gpu"])
    assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in spec["tolerations"])
    env = effective_env(objs, container)
    assert env["GEMSERVE_BACKEND"] == "vllm" and env["GEMSERVE_DEVICE"] == "cuda"
    args = shlex.split(env["GEMSERVE_VLLM_ARGS"])
    # Settings.vllm_args (GEMSERVE_VLLM_ARGS): vLLM engine arguments, KEY=VALUE or a bare KEY (a switch).
    assert args and all(re.fullmatch(r"[a-z0-9-]+(=\S+)?", arg) for arg in args), args
    parsed = dict(arg.partition("=")[::2] for arg in args)
    assert int(parsed.get("tensor-parallel-size", 1)) == int(limits["nvidia.com/gpu"])
    shm = {m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm"}
    assert shm and all(v["emptyDir"]["medium"] == "Memory" for v in spec["volumes"] if v["name"] in shm)
    cpu = server_container(objects("base"))["resources"]["requests"]["memory"]
    assert quantity(requests["memory"]) > quantity(cpu)
    assert "nvidia.com/gpu" not in str(objects("base")), "the CPU base must not ask for a GPU"


# ---- (c) kustomize layout ----------------------------------------------------------------------


def test_kustomizations_list_files_that_exist_and_every_manifest_is_listed() -> None:
    dirs = kustomization_dirs()
    assert {rel(d) for d in dirs} >= {"base", "gpu"}
    listed: set[Path] = set()
    for directory in dirs:
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
        assert kustomization["kind"] == "Kustomization"
        entries = list(kustomization.get("resources", [])) + [p["path"] for p in kustomization.get("patches", [])]
        assert entries, f"{rel(directory)}: empty kustomization"
        for entry in entries:
            target = (directory / entry).resolve()
            assert target.exists(), f"{rel(directory)}/kustomization.yaml lists missing {entry}"
            if target.is_dir():
                assert any((target / name).is_file() for name in KUSTOMIZATION_NAMES), f"{entry}: no kustomization"
            else:
                assert target.parent == directory, f"{entry}: kustomize only loads files inside its own directory"
                listed.add(target)
    unlisted = [rel(path) for path in MANIFESTS if path.resolve() not in listed]
    assert not unlisted, f"manifests no kustomization applies: {unlisted}"


@pytest.mark.parametrize("directory", kustomization_dirs(), ids=rel)
def test_every_kustomization_renders_every_object_it_lists(directory: Path) -> None:
    rendered = kustomized(rel(directory))
    assert rendered, f"{rel(directory)} renders nothing"
    for name in KUSTOMIZATION_NAMES:
        if (directory / name).is_file():
            for entry in yaml.safe_load((directory / name).read_text()).get("resources", []):
                target = (directory / entry).resolve()
                declared = (
                    objects(str(target.relative_to(K8S)))
                    if target.is_dir()
                    else {(d["kind"], d["metadata"]["name"]): d for d in documents(target)}
                )
                assert declared.keys() <= rendered.keys(), f"{rel(directory)}: {entry} is not rendered"
