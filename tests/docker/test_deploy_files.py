"""The deployment files in docker/: lint, structure, and wiring to the server's real metrics.

The image itself is built and run by scripts/docker_test.sh (`make docker-test`, called by
.ci/run); these tests are the fast, always-on half.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
DOCKERFILES = ["Dockerfile", "Dockerfile.cuda"]
METRIC_NAME = re.compile(r"\bgemserve_[a-z0-9_]+")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def hadolint_binary() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: it comes with the test extra (pip install -e '.[test]')")
    return found


def shipped_packages() -> list[str]:
    """The packages pyproject.toml installs; the images must install the same ones."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return [pattern.rstrip("*") for pattern in config["tool"]["setuptools"]["packages"]["find"]["include"]]


def dashboard_exprs() -> list[str]:
    dashboard = json.loads((DOCKER / "grafana/dashboards/gemserve.json").read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def exported_metric_names() -> set[str]:
    """Every sample name the server's registry exposes (histograms add _bucket/_sum/_count)."""
    from server.metrics import ServerMetrics

    names: set[str] = set()
    for family in ServerMetrics().registry.collect():
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
        if family.type == "histogram":
            names.update(f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        if family.type == "counter":
            names.add(f"{family.name}_total")
    return names


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_passes_hadolint(dockerfile: str) -> None:
    result = subprocess.run(
        [hadolint_binary(), "--no-color", str(DOCKER / dockerfile)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_runs_non_root_with_healthcheck_and_exec_entrypoint(dockerfile: str) -> None:
    text = (DOCKER / dockerfile).read_text()
    user = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root"), user
    assert re.search(r"^HEALTHCHECK .*--start-period=\d+s", text, re.M)
    assert "/health" in text
    assert re.search(r"^EXPOSE 8000$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["gemserve"\]$', text, re.M)
    assert re.search(r"^ARG BASE_IMAGE=\S+", text, re.M)


def test_cpu_dockerfile_defaults_need_no_local_workarounds() -> None:
    """On an ordinary machine `docker build -f docker/Dockerfile .` uses the public defaults."""
    text = (DOCKER / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=python:3.11-slim" in text
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    for leak in ("gemserve-base", "/opt/wheels", "/etc/ssl/certs/ca-certificates.crt", "--network"):
        assert leak not in text, leak


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_copies_every_shipped_package(dockerfile: str) -> None:
    copied = re.findall(r"^COPY (\w+) /opt/gemserve/\1$", (DOCKER / dockerfile).read_text(), re.M)
    assert set(shipped_packages()) <= set(copied)


def test_dockerignore_keeps_context_small_but_sends_the_sources() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    packages = tuple(f"!{package}/**" for package in shipped_packages())
    sources = ("!pyproject.toml", "!README.md", *packages, "!bench/**", "!docker/wheels/**")
    for needed in sources:
        assert needed in lines, needed
        assert lines.index("**") < lines.index(needed)  # deny everything first, then allow


def test_compose_services_ports_and_mounted_files_exist() -> None:
    compose = load_yaml(DOCKER / "compose.yaml")
    services = compose["services"]
    assert set(services) == {"gemserve", "prometheus", "grafana"}
    gemserve = services["gemserve"]
    assert (DOCKER / gemserve["build"]["context"] / gemserve["build"]["dockerfile"]).is_file()
    assert any(str(port).endswith(":8000") for port in gemserve["ports"])
    assert any(str(port).endswith(":9090") for port in services["prometheus"]["ports"])
    assert any(str(port).endswith(":3000") for port in services["grafana"]["ports"])
    for name in ("prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DOCKER / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name} uses undeclared volume {source}"


def test_gpu_override_reserves_nvidia_gpus_and_selects_vllm() -> None:
    override = load_yaml(DOCKER / "compose.gpu.yaml")["services"]["gemserve"]
    assert override["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    assert override["environment"]["GEMSERVE_BACKEND"] == "vllm"
    devices = override["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]


def test_prometheus_scrapes_the_gemserve_service() -> None:
    config = load_yaml(DOCKER / "prometheus/prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["gemserve"]["metrics_path"] == "/metrics"
    assert jobs["gemserve"]["static_configs"][0]["targets"] == ["gemserve:8000"]


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard_dir() -> None:
    compose = load_yaml(DOCKER / "compose.yaml")["services"]["grafana"]
    datasource = load_yaml(DOCKER / "grafana/provisioning/datasources/prometheus.yml")["datasources"][0]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    provider = load_yaml(DOCKER / "grafana/provisioning/dashboards/gemserve.yml")["providers"][0]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in compose["volumes"]}
    assert mounted[provider["options"]["path"]] == "./grafana/dashboards"
    dashboard = json.loads((DOCKER / "grafana/dashboards/gemserve.json").read_text())
    uids = {target["datasource"]["uid"] for panel in dashboard["panels"] for target in panel["targets"]}
    assert uids == {datasource["uid"]}


def test_dashboard_covers_the_issue_panels() -> None:
    dashboard = json.loads((DOCKER / "grafana/dashboards/gemserve.json").read_text())
    titles = " | ".join(panel["title"].lower() for panel in dashboard["panels"])
    wanted = ("time to first token", "end-to-end latency", "kept-token ratio", "kv cache", "running", "error rate")
    for title in wanted:
        assert title in titles, title
    exprs = " ".join(dashboard_exprs())
    assert "histogram_quantile(0.95" in exprs and "histogram_quantile(0.99" in exprs
    assert "sum by (method)" in exprs


def test_dashboard_queries_only_metrics_the_server_exports() -> None:
    """A renamed metric in server/metrics.py must break this test, not silently blank a panel."""
    exported = exported_metric_names()
    used = {name for expr in dashboard_exprs() for name in METRIC_NAME.findall(expr)}
    assert used, "no gemserve_* metric in the dashboard"
    assert used <= exported, f"dashboard queries metrics the server does not export: {sorted(used - exported)}"


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


@pytest.mark.parametrize("files", [["compose.yaml"], ["compose.yaml", "compose.gpu.yaml"]])
def test_compose_config_validates(files: list[str]) -> None:
    command = compose_command()
    if command is None:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed (structure tested above)")
    args = [*command, *(arg for f in files for arg in ("-f", str(DOCKER / f))), "config", "-q"]
    result = subprocess.run(args, capture_output=True, text=True, check=False, env={**os.environ, "COMPOSE_FILE": ""})
    assert result.returncode == 0, result.stderr


def test_docker_test_script_skips_loudly_without_a_daemon() -> None:
    """No daemon -> 'SKIPPED: <reason>' and exit 0, or exit 1 when the test is required."""
    env = {**os.environ, "DOCKER_HOST": "unix:///nonexistent/docker.sock", "DOCKER_TEST_NO_SETUP": "1"}
    script = str(ROOT / "scripts/docker_test.sh")
    skipped = subprocess.run([script], capture_output=True, text=True, env=env, timeout=60, check=False)
    assert skipped.returncode == 0
    assert "SKIPPED: docker image test: no reachable docker daemon" in skipped.stdout
    required = subprocess.run(
        [script], capture_output=True, text=True, env={**env, "DOCKER_TEST_REQUIRED": "1"}, timeout=60, check=False
    )
    assert required.returncode == 1
    assert "SKIPPED" in required.stdout
