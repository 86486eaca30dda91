"""Replicas behind the load balancer (issue 17): ``gemserve loadtest`` through HAProxy, 1 vs 2 replicas.

Each replica gets one core of its own (``taskset``, one torch thread), as it would get its own
machine in a fleet: "1 replica" is one server on core 0, "2 replicas" are servers on cores 0 and 1.
HAProxy (Debian's, on the host) runs docker/haproxy/haproxy.cfg with its compose-only parts
(Docker's DNS, the fixed ports) replaced by this run's servers, so the balancing policy measured
is the file's (leastconn, /ready checks, timeouts). The load generator and HAProxy are not pinned:
they take a little of both cores, which this 2-core machine cannot avoid.

Three set-ups, in turn each round (``--rounds``), with ``none`` and ``gemfilter`` each (``--compare``):
one replica at client concurrency 2, one at 4, two at 4. Two at 4 against one at 2 is the same load
per replica, so that ratio is bounded by 2.0; one at 4 is a single replica under the fleet's whole
load. Request throughput, TTFT and E2E percentiles per method, and which replica served what
(HAProxy's X-GemServe-Replica is not seen by the load tester, so each replica's own /metrics
request count is read instead).

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

from bench.common import (
    REPO_ROOT,
    RESULTS_DIR,
    brief,
    figure,
    loadtest,
    machine_description,
    replace_doc_section,
    write_json,
)
from bench.harness import (
    checkout_environment,
    free_port,
    metric_sums,
    serve_command,
    start_server,
    stop_server,
    wait_until_ready,
)

HEADING = "## Replicas behind the load balancer"
HAPROXY_CFG = REPO_ROOT / "docker" / "haproxy" / "haproxy.cfg"
API_KEY = "bench-replicas"
INPUT_LEN = 1024
OUTPUT_LEN = 16
METHODS = "none,gemfilter:256"
# (replicas, client concurrency): the fleet of 2 at concurrency 4 against one replica at the same
# load per replica (2: the fleet's ratio to it is bounded by 2.0) and at the fleet's whole load (4).
FLEETS = ((1, 2), (1, 4), (2, 4))


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
    command = ["taskset", "-c", str(core), *serve_command(port)]
    env = checkout_environment(API_KEY, OMP_NUM_THREADS="1")
    log = work / f"replica_core{core}_{port}.log"
    proc = start_server(command, env, log)
    wait_until_ready(proc, f"http://127.0.0.1:{port}", 600, log)
    return proc, port


def requests_served(port: int) -> int:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).text
    return int(metric_sums(text, ("gemserve_requests_total",))["gemserve_requests_total"] or 0)


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


def run_fleet(replicas: int, concurrency: int, work: Path, requests: int) -> dict[str, Any]:
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
        out = work / f"load_{replicas}_c{concurrency}_{time.time_ns()}"
        summary = loadtest(
            f"http://127.0.0.1:{api_port}",
            out,
            api_key=API_KEY,
            input_len=INPUT_LEN,
            output_len=OUTPUT_LEN,
            compare=METHODS,
            concurrency=concurrency,
            num_requests=requests,
            warmup=1,
        )
        served = [requests_served(port) - b for port, b in zip(ports, before, strict=True)]
        return {"methods": {name: brief(s) for name, s in summary.items()}, "served_per_replica": served}
    finally:
        if haproxy is not None:
            haproxy.terminate()
            haproxy.wait(timeout=10)
        for proc in procs:
            stop_server(proc, 30)


def fleet_name(replicas: int, concurrency: int) -> str:
    return f"{replicas}r_c{concurrency}"


def median_of(rounds: list[dict[str, Any]], method: str, key: str, stat: str | None = None) -> float:
    values = [r["methods"][method][key] if stat is None else r["methods"][method][key][stat] for r in rounds]
    return statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests, one round")
    parser.add_argument("--rounds", type=int, default=2, help="rounds, each running every fleet once")
    args = parser.parse_args()
    if shutil.which("haproxy") is None or shutil.which("taskset") is None:
        print("needs Debian's haproxy and taskset (util-linux): apt-get install haproxy", file=sys.stderr)
        return 2
    requests = 6 if args.quick else 12
    rounds = 1 if args.quick else args.rounds
    load_before = list(os.getloadavg())
    fleets: dict[str, list[dict[str, Any]]] = {fleet_name(*f): [] for f in FLEETS}
    with tempfile.TemporaryDirectory(prefix="gemserve-replicas-") as tmp:
        work = Path(tmp)
        for round_index in range(rounds):
            for replicas, concurrency in FLEETS:
                print(f"round {round_index + 1}: {replicas} replica(s), concurrency {concurrency}", flush=True)
                fleets[fleet_name(replicas, concurrency)].append(run_fleet(replicas, concurrency, work, requests))
    table: dict[str, dict[str, Any]] = {}
    for method in fleets[fleet_name(*FLEETS[0])][0]["methods"]:
        row = {
            name: {
                "req_per_s": median_of(runs, method, "request_throughput"),
                "ttft_p50_ms": median_of(runs, method, "ttft_ms", "p50"),
                "e2e_p50_ms": median_of(runs, method, "e2e_ms", "p50"),
            }
            for name, runs in fleets.items()
        }
        # Scale-out at the same load per replica (bound 2.0), per round and as the ratio of medians.
        per_round = [
            two["methods"][method]["request_throughput"] / one["methods"][method]["request_throughput"]
            for one, two in zip(fleets["1r_c2"], fleets["2r_c4"], strict=True)
        ]
        row["scale_out_2_vs_1"] = row["2r_c4"]["req_per_s"] / row["1r_c2"]["req_per_s"]
        row["scale_out_per_round"] = per_round
        table[method] = row
    result = {
        "benchmark": "replicas",
        "machine": machine_description(),
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "workload": {
            "input_len": INPUT_LEN,
            "output_len": OUTPUT_LEN,
            "fleets": [{"replicas": r, "concurrency": c} for r, c in FLEETS],
            "requests_per_method": requests,
            "methods": METHODS,
            "rounds": rounds,
            "replica_cores": "one core and one torch thread per replica (taskset)",
        },
        "fleets": fleets,
        "table": table,
    }
    write_json(RESULTS_DIR / "replicas_smollm2.json", result)
    plot(table, RESULTS_DIR / "replicas_smollm2.png")
    replace_doc_section(HEADING, doc_section(result))
    print(json.dumps(table, indent=2))
    return 0


def plot(table: dict[str, Any], path: Path) -> None:
    with figure(path, figsize=(6.5, 3.5)) as (_fig, ax):
        methods = list(table)
        names = [fleet_name(*f) for f in FLEETS]
        width = 0.8 / len(names)
        for offset, name in enumerate(names):
            xs = [i + offset * width for i in range(len(methods))]
            ax.bar(xs, [table[m][name]["req_per_s"] for m in methods], width, label=name.replace("_", ", "))
        ax.set_xticks([i + width * (len(names) - 1) / 2 for i in range(len(methods))], methods)
        ax.set_ylabel("requests / s (median of rounds)")
        ax.set_title(f"Through HAProxy, {INPUT_LEN}-token prompts, a core per replica")
        ax.legend(title="replicas, client concurrency")


def doc_section(result: dict[str, Any]) -> str:
    rows = [
        "| method | 1 replica, c2: req/s | 1 replica, c4: req/s | 2 replicas, c4: req/s | 2 vs 1 at c2 per replica "
        "(per round) | TTFT p50 ms (1r c2 / 1r c4 / 2r c4) |",
        "|---|---|---|---|---|---|",
    ]
    for method, row in result["table"].items():
        rounds = ", ".join(f"{r:.2f}" for r in row["scale_out_per_round"])
        ttft = " / ".join(f"{row[name]['ttft_p50_ms']:.0f}" for name in ("1r_c2", "1r_c4", "2r_c4"))
        rows.append(
            f"| {method} | {row['1r_c2']['req_per_s']:.3f} | {row['1r_c4']['req_per_s']:.3f} | "
            f"{row['2r_c4']['req_per_s']:.3f} | {row['scale_out_2_vs_1']:.2f}x ({rounds}) | {ttft} |"
        )
    served = [r["served_per_replica"] for r in result["fleets"]["2r_c4"]]
    w = result["workload"]
    return "\n".join(
        [
            HEADING,
            "",
            f"`python -m bench.replicas` ({w['rounds']} rounds, the three set-ups in turn each round; load average "
            f"{result['load_average_before'][0]:.2f} before, {result['load_average_after'][0]:.2f} after). "
            "`gemserve loadtest` through HAProxy running docker/haproxy/haproxy.cfg (leastconn, /ready checks), "
            f"{w['input_len']}-token synthetic needle prompts, {w['output_len']} output tokens (ignore_eos), closed "
            f"loop, {w['requests_per_method']} requests per method. Each replica has one core and one torch thread "
            "(taskset), as a replica in a fleet brings its own machine; the load generator and HAProxy share both "
            'cores. "2 vs 1" compares the fleet of two at concurrency 4 with one replica at concurrency 2, the '
            "same load per replica, so its bound is 2.0. Medians over rounds; raw data in "
            "bench/results/replicas_smollm2.json, plot replicas_smollm2.png.",
            "",
            *rows,
            "",
            f"Requests each replica served per 2-replica run, warm-ups included (its own /metrics): {served}.",
            "",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
