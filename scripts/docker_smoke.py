"""Black-box checks of a running GemServe container, standard library only (runs on the bare host).

    python3 scripts/docker_smoke.py http://127.0.0.1:PORT [--ready-timeout S] [--request-timeout S]

Waits for ``/ready``, asks a needle question with GemFilter compression and checks the answer
and the ``compression``/``metrics`` fields, then checks ``/metrics`` counted the request.
Exit 0 when every check passes; otherwise the failed check is printed and the exit code is 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

NEEDLE = "PELICAN"
BUDGET = 128
# ~800 prompt tokens for SmolLM2's tokenizer: long enough that a 128-token budget really drops text.
FILLER = " ".join(f"The weather report for day {i} said the sky was grey and the wind was calm." for i in range(40))


class SmokeFailure(Exception):
    """A check failed; the message says which and what came back."""


def http_json(url: str, body: dict[str, Any] | None = None, timeout: float = 10.0) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def wait_ready(base: str, timeout_s: float) -> float:
    """Poll /ready until 200; returns the seconds it took."""
    start = time.monotonic()
    last = "no answer"
    while time.monotonic() - start < timeout_s:
        try:
            status, body = http_json(f"{base}/ready", timeout=5)
            if status == 200 and isinstance(body, dict) and body.get("ready") is True:
                return time.monotonic() - start
            last = f"{status} {body}"
        except (OSError, ValueError) as exc:  # refused / reset while the server starts
            last = repr(exc)
        time.sleep(2)
    raise SmokeFailure(f"/ready not 200 within {timeout_s:.0f}s (last: {last})")


def needle_request() -> dict[str, Any]:
    third = len(FILLER) // 3
    context = f"{FILLER[:third]} The secret code word is {NEEDLE}. {FILLER[third:]}"
    question = "What is the secret code word? Answer with one word."
    return {
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": f"{context}\n\n{question}"}],
        "max_tokens": 12,
        "temperature": 0,
        "compression": {"method": "gemfilter", "budget": BUDGET},
    }


def check_chat(base: str, timeout_s: float) -> dict[str, Any]:
    status, body = http_json(f"{base}/v1/chat/completions", needle_request(), timeout=timeout_s)
    if status != 200 or not isinstance(body, dict):
        raise SmokeFailure(f"chat completion returned {status}: {body}")
    answer = body["choices"][0]["message"]["content"]
    if NEEDLE.lower() not in answer.lower():
        raise SmokeFailure(f"answer does not contain the needle {NEEDLE!r}: {answer!r}")
    compression = body.get("compression") or {}
    if compression.get("method") != "gemfilter":
        raise SmokeFailure(f"compression.method is not gemfilter: {compression}")
    prompt_tokens, kept = compression.get("prompt_tokens"), compression.get("kept_tokens")
    if not (isinstance(prompt_tokens, int) and isinstance(kept, int) and 0 < kept <= BUDGET < prompt_tokens):
        raise SmokeFailure(f"expected 0 < kept_tokens <= {BUDGET} < prompt_tokens, got {compression}")
    if prompt_tokens != body["usage"]["prompt_tokens"]:
        raise SmokeFailure(f"compression.prompt_tokens {prompt_tokens} != usage.prompt_tokens {body['usage']}")
    metrics = body.get("metrics") or {}
    if not metrics.get("e2e_ms", 0) > 0 or not metrics.get("ttft_ms", 0) > 0:
        raise SmokeFailure(f"metrics lack positive ttft_ms/e2e_ms: {metrics}")
    return body


def check_metrics(base: str) -> None:
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        text = response.read().decode()
    counted = [
        line
        for line in text.splitlines()
        if line.startswith("gemserve_requests_total{") and 'method="gemfilter"' in line and 'status="200"' in line
    ]
    if not counted or float(counted[0].rsplit(" ", 1)[1]) < 1:
        raise SmokeFailure("/metrics has no gemserve_requests_total sample for the gemfilter request")


def check_viewer(base: str) -> None:
    """The viewer page and its script ship in the image (package data, not only the source tree)."""
    for path, marker in (("/viewer", 'id="viewer-config"'), ("/viewer/viewer.js", "gemserveViewer")):
        with urllib.request.urlopen(f"{base}{path}", timeout=10) as response:
            text = response.read().decode()
        if response.status != 200 or marker not in text:
            raise SmokeFailure(f"{path} did not serve the viewer (status {response.status})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("base_url")
    parser.add_argument("--ready-timeout", type=float, default=300)
    parser.add_argument("--request-timeout", type=float, default=600)
    args = parser.parse_args()
    base = args.base_url.rstrip("/")
    try:
        waited = wait_ready(base, args.ready_timeout)
        print(f"ok   /ready after {waited:.1f}s")
        started = time.monotonic()
        body = check_chat(base, args.request_timeout)
        c = body["compression"]
        print(
            f"ok   chat + gemfilter in {time.monotonic() - started:.1f}s: {body['choices'][0]['message']['content']!r}"
            f" (kept {c['kept_tokens']}/{c['prompt_tokens']} tokens, ratio {c['ratio']:.3f})"
        )
        check_metrics(base)
        print("ok   /metrics counted the request")
        check_viewer(base)
        print("ok   /viewer serves the page and its script")
    except SmokeFailure as exc:
        print(f"FAIL {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
