"""Run every query of the Grafana dashboard against a real Prometheus that scrapes a real GemServe.

    python3 scripts/check_dashboard.py GEMSERVE_URL PROMETHEUS_URL [--dashboard FILE]

Sends two short requests and two invalid ones (400) in two rounds, so counters and histograms
move between scrapes and ``rate()`` is non-zero, waits for Prometheus to scrape them, then
evaluates each panel's PromQL with Grafana's variables filled in (``$model`` -> ``.*``,
``$__rate_interval`` -> ``1m``). Every query must parse, run and return data.
Standard library only: it runs on the bare host, like scripts/docker_smoke.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[1] / "docker/grafana/dashboards/gemserve.json"
VARIABLES = {"$model": ".*", "$__rate_interval": "1m"}


def get_json(url: str, timeout: float = 30.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


def post_chat(base: str, timeout: float, valid: bool = True) -> int:
    """A tiny GemFilter request; ``valid=False`` names a knob GemFilter lacks, which must be a 400."""
    compression: dict[str, Any] = {"method": "gemfilter", "budget": 128}
    if not valid:
        compression["no_such_knob"] = 1
    body = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2, "compression": compression}
    request = urllib.request.Request(
        f"{base}/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def wait_for_scrapes(prometheus: str, count: int, timeout_s: float) -> None:
    """Wait until the gemserve target has been scraped ``count`` more times (healthy)."""
    deadline = time.monotonic() + timeout_s
    seen: set[str] = set()
    while time.monotonic() < deadline:
        targets = get_json(f"{prometheus}/api/v1/targets")["data"]["activeTargets"]
        for target in targets:
            if target.get("health") == "up":
                seen.add(target.get("lastScrape", ""))
        if len(seen) > count:
            return
        time.sleep(0.5)
    raise RuntimeError(f"Prometheus did not scrape gemserve {count} times within {timeout_s:.0f}s (targets: {targets})")


# Panels of a feature the compose smoke leaves off: no data there is right, not a broken query.
OPT_IN_PANELS = {"Shadow check agreement": "--shadow-fraction (off by default)"}


def panel_queries(path: Path) -> list[tuple[str, str]]:
    dashboard = json.loads(path.read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def instant_query(prometheus: str, expr: str) -> list[Any]:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    answer = get_json(f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
    if answer.get("status") != "success":
        raise RuntimeError(f"query failed: {expr}: {answer}")
    return answer["data"]["result"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gemserve_url")
    parser.add_argument("prometheus_url")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    gemserve, prometheus = args.gemserve_url.rstrip("/"), args.prometheus_url.rstrip("/")
    failures: list[str] = []
    try:
        wait_for_scrapes(prometheus, 1, args.timeout)
        for _ in range(2):
            statuses = (post_chat(gemserve, args.timeout), post_chat(gemserve, args.timeout, valid=False))
            if statuses != (200, 400):
                raise RuntimeError(f"expected statuses (200, 400), got {statuses}")
            wait_for_scrapes(prometheus, 2, args.timeout)
        for title, expr in panel_queries(args.dashboard):
            result = instant_query(prometheus, expr)
            if not result and title in OPT_IN_PANELS:
                print(f"skip no data  {title}: opt-in, {OPT_IN_PANELS[title]}")
            elif not result:
                failures.append(f"no data: {title}: {expr}")
            else:
                print(f"ok   {len(result)} series  {title}")
    except (OSError, RuntimeError, KeyError) as exc:
        failures.append(str(exc))
    for failure in failures:
        print(f"FAIL {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
