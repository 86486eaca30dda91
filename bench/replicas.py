"""Replicas behind the load balancer (issue 17): ``gemserve loadtest`` through HAProxy, 1 vs 2 replicas.

Each replica gets one core of its own (``taskset``, one torch thread), as it would get its own
machine in a fleet: "1 replica" is one server on core 0, "2 replicas" are servers on cores 0 and 1.
HAProxy (Debian's, on the host) runs docker/haproxy/haproxy.cfg with its compose-only parts
(Docker's DNS, the fixed ports) replaced by this run's servers, so the balancing policy measured
is the file's (leastconn, /ready checks, timeouts). The load generator and HAProxy are not pinned:
they take a little of both cores, which this 2-core machine cannot avoid.

Both fleets are measured in one run, A B A B (``--rounds``), with ``none`` and ``gemfilter`` each
(``--compare``): request throughput, TTFT and E2E percentiles per method, the 2-vs-1 ratio (its
physical bound is 2.0) and which replica served what (HAProxy's X-GemServe-Replica is not seen by
the load tester, so each replica's own /metrics request count is read instead).

    python -m bench.replicas [--quick]

Writes bench/results/replicas_smollm2.json + .png and the "Replicas" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import REPO_ROOT, RESULTS_DIR, machine_description, replace_doc_section, write_json
from bench.soak import free_port, start_server, stop_server, wait_until_ready

HEADING = "## Replicas behind the load balancer"
HAPROXY_CFG = REPO_ROOT / "docker" / "haproxy" / "haproxy.cfg"
API_KEY = "bench-replicas"
INPUT_LEN = 1024
OUTPUT_LEN = 16
CONCURRENCY = 4
METHODS = "none,gemfilter:256"


def host_haproxy_config(servers: list[int], api_port: int, stats_port: int) -> str:
    """docker/haproxy/haproxy.cfg with Docker's DNS discovery swapped for ``servers`` on loopback."""
    text = HAPROXY_CFG.read_text(encoding="utf-8")
    text = re.sub(r"\nresolvers docker\n(?:[ \t]+.*\n|[ \t]*#.*\n)*", "\n", text)
    text = re.sub(r" resolvers docker resolve-prefer ipv4 init-addr none", "", text)
    lines = "\n".join(f"    server replica{i + 1} 127.0.0.1:{port}" for i, port in enumerate(servers))
    text, count = re.subn(r"^[ \t]*server-template .*$", lines, text, flags=re.M)
    if count != 1:
        raise RuntimeError(f"{HAPROXY_CFG} has no single server-template line to replace")
    text = text.replace("bind :8080", f"bind 127.0.0.1:{api_port}").replace(
        "bind :8404", f"bind 127.0.0.1:{stats_port}"
    )
    return text.replace("log stdout format raw local0 info", "log stdout format raw local0 warning")


def start_replica(core: int, work: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = ["taskset", "-c", str(core), sys.executable, "-m", "server.cli", "serve", "--port", str(port)]
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "GEMSERVE_API_KEY": API_KEY, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}
    env.pop("GEMSERVE_API_KEY_FILE", None)
    log = work / f"replica_core{core}_{port}.log"
    proc = start_server(command, env, log)
    wait_until_ready(proc, f"http://127.0.0.1:{port}", 600, log)
    return proc, port


def requests_served(port: int) -> int:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    return int(
        sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("gemserve_requests_total{"))
    )


def wait_all_up(stats_port: int, count: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            csv = httpx.get(f"http://127.0.0.1:{stats_port}/stats;csv", timeout=5).text
        except httpx.TransportError:  # HAProxy is still binding its ports
            time.sleep(0.2)
            continue
        up = [line for line in csv.splitlines() if line.startswith("gemserve,replica") and ",UP," in line]
        if len(up) == count:
            return
        time.sleep(0.5)
    raise RuntimeError(f"HAProxy did not see {count} replicas UP within {timeout_s:g} s")


def loadtest(url: str, out: Path, requests: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "server.cli", "loadtest", "--base-url", url, "--api-key", API_KEY]
    command += ["--no-progress", "--output-dir", str(out), "--ignore-eos", "--endpoint", "completions"]
    command += ["--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN), "--compare", METHODS]
    command += ["--concurrency", str(CONCURRENCY), "--num-requests", str(requests), "--warmup", "1"]
    subprocess.run(command, check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text())["summary"]


def brief(summary: dict[str, Any]) -> dict[str, Any]:
    return {
        "completed": summary["requests"]["completed"],
        "failed": summary["requests"]["failed"],
        "request_throughput": summary["request_throughput"],
        "ttft_ms": summary["ttft_ms"],
        "e2e_ms": summary["e2e_ms"],
        "kept_tokens": summary["kept_tokens"],
    }


def run_fleet(replicas: int, work: Path, requests: int) -> dict[str, Any]:
    """Start ``replicas`` servers (a core each) and HAProxy, load them, stop everything."""
    procs: list[subprocess.Popen[bytes]] = []
    ports: list[int] = []
    haproxy = None
    try:
        for core in range(replicas):
            proc, port = start_replica(core, work)
            procs.append(proc)
            ports.append(port)
        api_port, stats_port = free_port(), free_port()
        config = work / f"haproxy_{replicas}.cfg"
        config.write_text(host_haproxy_config(ports, api_port, stats_port), encoding="utf-8")
        subprocess.run(["haproxy", "-c", "-q", "-f", str(config)], check=True)
        haproxy = subprocess.Popen(["haproxy", "-f", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_all_up(stats_port, replicas)
        before = [requests_served(port) for port in ports]
        summary = loadtest(f"http://127.0.0.1:{api_port}", work / f"load_{replicas}_{time.time_ns()}", requests)
        served = [requests_served(port) - b for port, b in zip(ports, before, strict=True)]
        return {"methods": {name: brief(s) for name, s in summary.items()}, "served_per_replica": served}
    finally:
        if haproxy is not None:
            haproxy.terminate()
            haproxy.wait(timeout=10)
        for proc in procs:
            stop_server(proc, 30)


def median_of(rounds: list[dict[str, Any]], method: str, key: str) -> float:
    return statistics.median(r["methods"][method][key] for r in rounds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests, one round")
    parser.add_argument("--rounds", type=int, default=2, help="A B rounds (each fleet once per round)")
    args = parser.parse_args()
    if shutil.which("haproxy") is None or shutil.which("taskset") is None:
        print("needs Debian's haproxy and taskset (util-linux): apt-get install haproxy", file=sys.stderr)
        return 2
    requests = 6 if args.quick else 12
    rounds = 1 if args.quick else args.rounds
    load_before = list(os.getloadavg())
    fleets: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    with tempfile.TemporaryDirectory(prefix="gemserve-replicas-") as tmp:
        work = Path(tmp)
        for round_index in range(rounds):
            for replicas in (1, 2):
                print(f"round {round_index + 1}: {replicas} replica(s)", flush=True)
                fleets[replicas].append(run_fleet(replicas, work, requests))
    methods = list(fleets[1][0]["methods"])
    table = {}
    for method in methods:
        one, two = (
            median_of(fleets[1], method, "request_throughput"),
            median_of(fleets[2], method, "request_throughput"),
        )
        table[method] = {
            "req_per_s_1": one,
            "req_per_s_2": two,
            "ratio_2_vs_1": two / one,
            "ttft_p50_ms_1": statistics.median(r["methods"][method]["ttft_ms"]["p50"] for r in fleets[1]),
            "ttft_p50_ms_2": statistics.median(r["methods"][method]["ttft_ms"]["p50"] for r in fleets[2]),
            "e2e_p50_ms_1": statistics.median(r["methods"][method]["e2e_ms"]["p50"] for r in fleets[1]),
            "e2e_p50_ms_2": statistics.median(r["methods"][method]["e2e_ms"]["p50"] for r in fleets[2]),
        }
    result = {
        "benchmark": "replicas",
        "machine": machine_description(),
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "workload": {
            "input_len": INPUT_LEN,
            "output_len": OUTPUT_LEN,
            "concurrency": CONCURRENCY,
            "requests_per_method": requests,
            "methods": METHODS,
            "rounds": rounds,
            "replica_cores": "one core and one torch thread per replica (taskset)",
        },
        "fleets": {str(k): v for k, v in fleets.items()},
        "table": table,
    }
    out = RESULTS_DIR / "replicas_smollm2.json"
    write_json(out, result)
    plot(table, RESULTS_DIR / "replicas_smollm2.png")
    replace_doc_section(HEADING, doc_section(result))
    print(json.dumps(table, indent=2))
    return 0


def plot(table: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(table)
    width = 0.35
    for offset, (key, label) in enumerate((("req_per_s_1", "1 replica"), ("req_per_s_2", "2 replicas"))):
        ax.bar([i + offset * width for i in range(len(names))], [table[n][key] for n in names], width, label=label)
    ax.set_xticks([i + width / 2 for i in range(len(names))], names)
    ax.set_ylabel("requests / s (median of rounds)")
    ax.set_title(f"Through HAProxy, {INPUT_LEN}-token prompts, concurrency {CONCURRENCY}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def doc_section(result: dict[str, Any]) -> str:
    rows = [
        "| method | 1 replica req/s | 2 replicas req/s | 2 vs 1 | TTFT p50 1 / 2 (ms) | E2E p50 1 / 2 (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for method, row in result["table"].items():
        rows.append(
            f"| {method} | {row['req_per_s_1']:.3f} | {row['req_per_s_2']:.3f} | {row['ratio_2_vs_1']:.2f}x | "
            f"{row['ttft_p50_ms_1']:.0f} / {row['ttft_p50_ms_2']:.0f} | {row['e2e_p50_ms_1']:.0f} / "
            f"{row['e2e_p50_ms_2']:.0f} |"
        )
    served = [r["served_per_replica"] for r in result["fleets"]["2"]]
    w = result["workload"]
    return "\n".join(
        [
            HEADING,
            "",
            f"`python -m bench.replicas` ({w['rounds']} rounds, 1 and 2 replicas alternating; load average "
            f"{result['load_average_before'][0]:.2f} before, {result['load_average_after'][0]:.2f} after). "
            f"`gemserve loadtest` through HAProxy running docker/haproxy/haproxy.cfg (leastconn, /ready checks), "
            f"{w['input_len']}-token synthetic needle prompts, {w['output_len']} output tokens, closed loop at "
            f"concurrency {w['concurrency']}, {w['requests_per_method']} requests per method. Each replica has one "
            "core and one torch thread (taskset), as a replica in a fleet brings its own machine; the load generator "
            "and HAProxy share both cores. Medians over rounds; raw data in bench/results/replicas_smollm2.json.",
            "",
            *rows,
            "",
            f"Requests each replica served per 2-replica run (its own /metrics): {served}.",
            "",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
