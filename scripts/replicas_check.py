"""HTTP checks for the replicas stage of scripts/docker_test.sh: HAProxy's view of the replicas,
requests through it, and Prometheus scraping each replica. The shell starts and breaks containers;
this script only looks.

    python3 scripts/replicas_check.py wait STATS_URL --addr IP:PORT ... --state UP|DOWN
    python3 scripts/replicas_check.py send LB_URL --count N --allow NAME,... [--require NAME,...]
        [--stats STATS_URL --unused-addr IP:PORT]
    python3 scripts/replicas_check.py probe URL          (/health 200, /ready 503 with the load error)
    python3 scripts/replicas_check.py prometheus PROM_URL --job JOB --addr IP:PORT ...

STATS_URL is HAProxy's CSV (http://HOST:8404/stats;csv); a server is matched by its address
(the addr column, filled by `stats show-legends`), since server-template names slots
replica1..replica8 in the order DNS answers. Standard library only, like scripts/docker_smoke.py.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

BACKEND = "gemserve"
HEADER = "X-GemServe-Replica"
BODY = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}


def fail(message: str) -> None:
    print(f"FAIL {message}", file=sys.stderr)
    sys.exit(1)


def http(url: str, data: dict[str, Any] | None = None, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body); an HTTP error status is a result, not an exception."""
    request = urllib.request.Request(url)
    if data is not None:
        request = urllib.request.Request(
            url, data=json.dumps(data).encode(), headers={"Content-Type": "application/json"}
        )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def servers(stats_url: str) -> list[dict[str, str]]:
    """The backend's servers (not the BACKEND summary row) from HAProxy's stats CSV."""
    status, _, body = http(stats_url, timeout=5)
    if status != 200:
        raise OSError(f"stats answered {status}")
    text = body.decode().lstrip("# ")
    rows = csv.DictReader(io.StringIO(text))
    return [row for row in rows if row.get("pxname") == BACKEND and row.get("svname") not in ("BACKEND", "FRONTEND")]


def by_addr(stats_url: str) -> dict[str, dict[str, str]]:
    return {row["addr"]: row for row in servers(stats_url) if row.get("addr")}


def summary(rows: dict[str, dict[str, str]]) -> str:
    return ", ".join(f"{row['svname']}@{addr} {row['status']} ({row['check_status']})" for addr, row in rows.items())


def cmd_wait(args: argparse.Namespace) -> None:
    """Wait until every address is in state ``--state`` (exactly: "UP", or "DOWN"); print their names."""
    deadline = time.monotonic() + args.timeout
    rows: dict[str, dict[str, str]] = {}
    while time.monotonic() < deadline:
        try:
            rows = by_addr(args.stats_url)
        except OSError:
            rows = {}
        if all(rows.get(addr, {}).get("status") == args.state for addr in args.addr):
            print(" ".join(rows[addr]["svname"] for addr in args.addr))
            return
        time.sleep(0.25)
    fail(f"not all of {args.addr} {args.state} within {args.timeout:.0f}s: {summary(rows) or 'no stats'}")


def cmd_send(args: argparse.Namespace) -> None:
    """``--count`` completions through the balancer: every one 200, answered by an allowed server."""
    allow, require = set(args.allow.split(",")), set(filter(None, args.require.split(",")))
    served: dict[str, int] = {}
    for i in range(args.count):
        status, headers, body = http(f"{args.lb_url}/v1/completions", BODY, timeout=args.timeout)
        name = headers.get(HEADER.lower(), "")
        if status != 200:
            fail(f"request {i + 1}: status {status} from {name or '?'}: {body[:200]!r}")
        if name not in allow:
            fail(f"request {i + 1} answered by {name or 'no ' + HEADER}, allowed only {sorted(allow)}")
        served[name] = served.get(name, 0) + 1
    if not require <= set(served):
        fail(f"{sorted(require - set(served))} answered none of {args.count} requests (served: {served})")
    if args.unused_addr:
        rows = by_addr(args.stats)
        for addr in args.unused_addr:
            row = rows.get(addr)
            if row is None or row["stot"] != "0":
                fail(f"{addr} got sessions: {row and row['svname']} stot={row and row['stot']}")
    line = f"{args.count}/{args.count} 200, served by " + ", ".join(f"{k} x{v}" for k, v in sorted(served.items()))
    print(line + "".join(f"; {addr} had no session" for addr in args.unused_addr))


def cmd_probe(args: argparse.Namespace) -> None:
    """A replica that is alive (/health 200) but cannot serve (/ready 503 with its load error)."""
    deadline = time.monotonic() + args.timeout
    while True:
        try:
            health = http(f"{args.url}/health", timeout=5)[0]
            break
        except OSError:
            if time.monotonic() > deadline:
                fail(f"{args.url}/health never answered within {args.timeout:.0f}s")
            time.sleep(0.25)
    status, _, body = http(f"{args.url}/ready", timeout=5)
    ready = json.loads(body)
    if health != 200 or status != 503 or ready.get("ready") is not False or not ready.get("error"):
        fail(f"wanted /health 200 and /ready 503 with an error, got {health} and {status} {ready}")
    print(f"/health 200, /ready 503: {ready['error'][:80]}")


def prom_query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    answer = json.loads(http(f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")[2])
    if answer.get("status") != "success":
        raise RuntimeError(f"query failed: {expr}: {answer}")
    return answer["data"]["result"]


def cmd_prometheus(args: argparse.Namespace) -> None:
    """The job's targets are exactly ``--addr`` (found by DNS-SD), all up, each with requests
    counted, and the dashboard-style sum over instances equals the per-instance values added."""
    deadline = time.monotonic() + args.timeout
    wanted, seen, problem = set(args.addr), set(), "not asked yet"
    metric = f'gemserve_requests_total{{job="{args.job}"}}'
    while time.monotonic() < deadline:
        try:
            targets = json.loads(http(f"{args.prometheus_url}/api/v1/targets", timeout=5)[2])["data"]["activeTargets"]
            jobs = [t for t in targets if t["labels"].get("job") == args.job]
            seen = {t["labels"]["instance"] for t in jobs if t.get("health") == "up"}
            per_instance = {
                r["metric"]["instance"]: float(r["value"][1])
                for r in prom_query(args.prometheus_url, f"sum by (instance) ({metric})")
            }
            total = prom_query(args.prometheus_url, f"sum({metric})")
            if seen == wanted and set(per_instance) == wanted and all(v > 0 for v in per_instance.values()):
                summed = float(total[0]["value"][1])
                if abs(summed - sum(per_instance.values())) > 1e-9:
                    fail(f"sum over instances {summed} != {per_instance}")
                counts = ", ".join(f"{k} {v:.0f}" for k, v in sorted(per_instance.items()))
                print(f"job {args.job}: {len(seen)} targets up via DNS-SD; requests {counts}; sum {summed:.0f}")
                return
            problem = f"targets up {sorted(seen)}, requests by instance {per_instance}"
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            problem = str(exc)
        time.sleep(0.5)
    fail(f"Prometheus job {args.job} wanted {sorted(wanted)} within {args.timeout:.0f}s: {problem}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    wait = sub.add_parser("wait")
    wait.add_argument("stats_url")
    wait.add_argument("--addr", action="append", required=True)
    wait.add_argument("--state", choices=("UP", "DOWN"), required=True)
    wait.add_argument("--timeout", type=float, default=120)
    send = sub.add_parser("send")
    send.add_argument("lb_url")
    send.add_argument("--count", type=int, default=10)
    send.add_argument("--allow", required=True)
    send.add_argument("--require", default="")
    send.add_argument("--stats", help="with --unused-addr: the stats CSV URL")
    send.add_argument("--unused-addr", action="append", default=[], help="a server that must have had no session")
    send.add_argument("--timeout", type=float, default=120)
    probe = sub.add_parser("probe")
    probe.add_argument("url")
    probe.add_argument("--timeout", type=float, default=120)
    prometheus = sub.add_parser("prometheus")
    prometheus.add_argument("prometheus_url")
    prometheus.add_argument("--job", required=True)
    prometheus.add_argument("--addr", action="append", required=True)
    prometheus.add_argument("--timeout", type=float, default=60)
    args = parser.parse_args()
    {"wait": cmd_wait, "send": cmd_send, "probe": cmd_probe, "prometheus": cmd_prometheus}[args.command](args)


if __name__ == "__main__":
    main()
