"""Every Prometheus series names the model as clients see it (/v1/models), so a dashboard
can join request counts with latency histograms and the load gauges."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import make_test_app, serve_app
from tests.test_server_http import HISTOGRAMS

SERVED = "my-served-name"


def model_labels_by_series(url: str) -> dict[str, set[str]]:
    """Metric family -> the ``model`` label values its samples carry (families without samples left out)."""
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        if not family.name.startswith("gemserve_"):
            continue
        for sample in family.samples:
            labels.setdefault(family.name, set()).add(sample.labels.get("model"))
    return labels


def test_every_series_carries_the_served_model_name(engine) -> None:
    assert engine.model_name != SERVED  # the test means nothing if both names agree
    with serve_app(make_test_app(engine, served_model_name=SERVED)) as url:
        assert [card["id"] for card in httpx.get(f"{url}/v1/models").json()["data"]] == [SERVED]
        body = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=120).status_code == 200
        labels = model_labels_by_series(url)
    expected = {
        "gemserve_requests",
        "gemserve_generation_tokens",
        *HISTOGRAMS,
        "gemserve_requests_running",
        "gemserve_requests_waiting",
    }
    assert expected <= set(labels), sorted(expected - set(labels))
    wrong = {name: values for name, values in labels.items() if values != {SERVED}}
    assert not wrong, f"series not labelled model={SERVED!r}: {wrong}"
