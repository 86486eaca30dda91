"""The deployment files in docker/: lint, structure, and wiring to the server's real metrics.

The image itself is built and run by scripts/docker_test.sh (`make docker-test`, called by
.ci/run); these tests are the fast, always-on half.
"""

from __future__ import annotations

import itertools
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
    assert set(services) == {"gemserve", "gemserve-replica", "balancer", "prometheus", "grafana"}
    gemserve = services["gemserve"]
    assert (DOCKER / gemserve["build"]["context"] / gemserve["build"]["dockerfile"]).is_file()
    assert any(str(port).endswith(":8000") for port in gemserve["ports"])
    assert any(str(port).endswith(":9090") for port in services["prometheus"]["ports"])
    assert any(str(port).endswith(":3000") for port in services["grafana"]["ports"])
    for name in ("gemserve", "balancer", "prometheus", "grafana"):
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DOCKER / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose["volumes"], f"{name} uses undeclared volume {source}"


def test_plain_up_is_unchanged_and_the_replicas_profile_adds_replicas_and_balancer() -> None:
    services = load_yaml(DOCKER / "compose.yaml")["services"]
    for name in ("gemserve", "prometheus", "grafana"):
        assert "profiles" not in services[name], name
    for name in ("gemserve-replica", "balancer"):
        assert services[name]["profiles"] == ["replicas"], name


def test_replica_service_is_gemserve_unpublished_and_scalable() -> None:
    services = load_yaml(DOCKER / "compose.yaml")["services"]
    gemserve, replica = services["gemserve"], services["gemserve-replica"]
    for key in ("build", "image", "environment", "init", "restart"):
        assert replica[key] == gemserve[key], key  # one YAML anchor: the same image and settings
    assert gemserve["image"] == "${GEMSERVE_IMAGE:-gemserve:cpu}"
    assert "ports" not in replica and "container_name" not in replica  # --scale needs both absent
    assert "volumes" not in replica  # replicas created at once race on a fresh volume's copy-up
    assert replica["deploy"]["replicas"] == "${GEMSERVE_REPLICAS:-2}"


def test_balancer_service_mounts_the_haproxy_config_and_publishes_api_and_stats() -> None:
    balancer = load_yaml(DOCKER / "compose.yaml")["services"]["balancer"]
    assert balancer["image"].startswith("${GEMSERVE_LB_IMAGE:-haproxy:")
    assert "./haproxy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro" in balancer["volumes"]
    targets = {str(port).rsplit(":", 1)[1] for port in balancer["ports"]}
    assert targets == {"8080", "8404"}
    binds = {words[1].lstrip(":") for words in haproxy_directives("frontend", "bind")}
    assert binds == targets
    stats_port = next(str(port) for port in balancer["ports"] if str(port).endswith(":8404"))
    assert stats_port.startswith("127.0.0.1:"), "the stats page shows replica addresses: this host only"
    assert balancer["depends_on"] == ["gemserve-replica"]


def haproxy_sections() -> dict[str, list[list[str]]]:
    """docker/haproxy/haproxy.cfg as {"backend gemserve": [[keyword, arg, ...], ...], ...}."""
    sections: dict[str, list[list[str]]] = {}
    current: list[list[str]] = []
    for line in (DOCKER / "haproxy/haproxy.cfg").read_text().splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if line[0].isspace():
            current.append(words)
        else:
            current = sections.setdefault(" ".join(words), [])
    return sections


def haproxy_directives(section_kind: str, keyword: str) -> list[list[str]]:
    return [
        words
        for name, lines in haproxy_sections().items()
        if name.split()[0] == section_kind
        for words in lines
        if words[0] == keyword
    ]


def test_haproxy_balances_least_connections_over_replicas_that_pass_ready() -> None:
    sections = haproxy_sections()
    backend = [" ".join(words) for words in sections["backend gemserve"]]
    assert "balance leastconn" in backend
    assert "option httpchk GET /ready" in backend
    assert "http-check expect status 200" in backend
    assert "http-response set-header X-GemServe-Replica %s" in backend
    template = next(words for words in sections["backend gemserve"] if words[0] == "server-template")
    assert template[1:3] == ["replica", "1-8"]
    assert template[3] == "gemserve-replica:8000"  # the compose service name and the image's EXPOSE
    default_server = next(words for words in sections["backend gemserve"] if words[0] == "default-server")
    options = dict(itertools.pairwise(default_server))  # each word -> the word after it
    assert "check" in default_server and options["resolvers"] == "docker" and options["init-addr"] == "none"
    assert int(options["fall"]) >= 2 and int(options["rise"]) >= 1 and options["inter"] == "2s"
    resolvers = [" ".join(words) for words in sections["resolvers docker"]]
    assert "nameserver dns 127.0.0.11:53" in resolvers  # Docker's embedded DNS


def test_haproxy_timeouts_let_long_prefills_and_sse_streams_through() -> None:
    timeouts = {words[1]: words[2] for words in haproxy_sections()["defaults"] if words[0] == "timeout"}

    def seconds(value: str) -> float:
        number, unit = re.fullmatch(r"(\d+)(ms|s|m|h)?", value).groups()
        return int(number) * {"ms": 0.001, "s": 1, None: 0.001, "m": 60, "h": 3600}[unit]

    assert seconds(timeouts["server"]) >= 300 and seconds(timeouts["client"]) >= 300
    assert seconds(timeouts["check"]) <= 5  # a hung replica (accepting TCP, answering nothing) fails fast


def test_haproxy_stats_show_each_server_with_its_address() -> None:
    stats = [" ".join(words) for words in haproxy_sections()["frontend stats"]]
    assert "stats uri /stats" in stats
    assert "stats show-legends" in stats  # fills the CSV's addr column: scripts/replicas_check.py matches on it
    assert not any(line.startswith("stats admin") for line in stats)


def test_haproxy_config_is_valid() -> None:
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        pytest.skip("no haproxy binary (apt-get install haproxy); structure tested above, run by make docker-test")
    result = subprocess.run(
        [haproxy, "-c", "-f", str(DOCKER / "haproxy/haproxy.cfg")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stdout + result.stderr


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


def test_prometheus_discovers_every_replica_through_dns() -> None:
    """One target per replica (Docker's DNS gives one A record each), not one behind the balancer."""
    jobs = {job["job_name"]: job for job in load_yaml(DOCKER / "prometheus/prometheus.yml")["scrape_configs"]}
    replica = jobs["gemserve-replica"]
    assert replica["metrics_path"] == "/metrics"
    (discovery,) = replica["dns_sd_configs"]
    assert discovery["names"] == ["gemserve-replica"] and discovery["type"] == "A" and discovery["port"] == 8000
    assert "gemserve-replica" in load_yaml(DOCKER / "compose.yaml")["services"]


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


AGGREGATIONS = {"sum", "avg", "min", "max", "count", "group", "stddev", "stdvar", "topk", "bottomk", "quantile"}
PROMQL_TOKEN = re.compile(r'"(?:\\.|[^"\\])*"|[A-Za-z_:][\w:]*|\S')
PROMQL_KEYWORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "offset",
    "and",
    "or",
    "unless",
}


def series_contexts(expr: str) -> list[tuple[str, list[tuple[str, tuple[str, ...]]]]]:
    """Each series selector in ``expr`` with the calls around it, outermost first: (name, by-labels).

    Only the prefix form ``sum by (le) (...)`` is understood (the dashboard's style); label
    matchers ``{...}`` and ranges ``[...]`` are skipped.
    """
    tokens = PROMQL_TOKEN.findall(expr)
    stack: list[tuple[str, tuple[str, ...]]] = []
    found: list[tuple[str, list[tuple[str, tuple[str, ...]]]]] = []
    i = 0
    while i < len(tokens):
        token, following = tokens[i], tokens[i + 1] if i + 1 < len(tokens) else ""
        if token in "{[":
            i = tokens.index("}" if token == "{" else "]", i) + 1
            continue
        if token in AGGREGATIONS and following in ("by", "without"):
            close = tokens.index(")", i + 2)
            labels = tuple(t for t in tokens[i + 3 : close] if t != ",")
            stack.append((token if following == "by" else f"{token} without", labels))
            i = close + 2  # past the label list and the aggregation's own "("
            continue
        if token == "(":
            stack.append(("", ()))
        elif re.fullmatch(r"[A-Za-z_:][\w:]*", token) and following == "(":
            stack.append((token, ()))
            i += 1
        elif token == ")":
            stack.pop()
        elif re.fullmatch(r"[A-Za-z_:][\w:]*", token) and token not in PROMQL_KEYWORDS:
            found.append((token, list(stack)))
        i += 1
    return found


def aggregation_problem(expr: str) -> str | None:
    """Why ``expr`` would draw one line per instance (scrape target) instead of their total; None if it does not."""
    contexts = series_contexts(expr)
    if not contexts:
        return "no series selector"
    for series, calls in contexts:
        aggregations = [(name, labels) for name, labels in calls if name.split()[0] in AGGREGATIONS]
        if not aggregations:
            return f"{series} is not aggregated"
        if any(name.endswith("without") or {"instance", "pod"} & set(labels) for name, labels in aggregations):
            return f"{series} keeps the instance label"
        names = [name for name, _ in calls]
        if "histogram_quantile" in names:
            inner = [labels for name, labels in calls[names.index("histogram_quantile") :] if name in AGGREGATIONS]
            if not inner or "le" not in inner[0]:
                return f"{series}: histogram_quantile over a sum that drops le"
    return None


@pytest.mark.parametrize(
    ("expr", "ok"),
    [
        ('sum by (method) (rate(gemserve_requests_total{model=~"$model"}[1m]))', True),
        ("histogram_quantile(0.95, sum by (le) (rate(gemserve_e2e_request_latency_seconds_bucket[1m])))", True),
        ("sum(rate(a_total[1m])) / sum(rate(b_total[1m]))", True),
        ("rate(gemserve_requests_total[1m])", False),
        ("gemserve_requests_running", False),
        ("sum(rate(a_total[1m])) / rate(b_total[1m])", False),
        ("histogram_quantile(0.95, rate(gemserve_selection_seconds_bucket[1m]))", False),
        ("histogram_quantile(0.95, sum by (method) (rate(gemserve_selection_seconds_bucket[1m])))", False),
        ("sum by (instance) (gemserve_requests_running)", False),
        ("sum without (method) (gemserve_requests_running)", False),
    ],
)
def test_aggregation_checker(expr: str, ok: bool) -> None:
    assert (aggregation_problem(expr) is None) == ok, aggregation_problem(expr)


def test_every_dashboard_query_sums_over_instances() -> None:
    """With N replicas (docs/replicas.md) a panel must show the service's total, not N lines."""
    problems = {expr: aggregation_problem(expr) for expr in dashboard_exprs()}
    assert not {expr: why for expr, why in problems.items() if why}


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
