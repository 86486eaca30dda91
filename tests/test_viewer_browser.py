"""The viewer page in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``)
driven by selenium against a real server on the embedded model.

``make test-browser`` installs the browser where apt-get can and runs this file; elsewhere (and
under ``make test`` on a machine without Chromium) it skips, saying why. Assertions are on the
DOM, never on pixels; each test saves a screenshot under its tmp dir. With
``GEMSERVE_VIEWER_SCREENSHOT=docs/viewer.png`` the side-by-side test also writes the README's
screenshot there.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from contract.needles import Needle, build_case
from tests.conftest import TEST_API_KEY

pytestmark = pytest.mark.browser  # make test-browser runs it, make test does not

selenium = pytest.importorskip("selenium", reason="selenium is not installed (the test extra installs it)")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
NO_BROWSER = (
    "no Chromium + ChromeDriver on this machine: `make test-browser` installs Debian's chromium and "
    "chromium-driver with apt-get (as root)"
)
NEEDLE = Needle(
    "The special magic number for Tallinn is 4817263.", "What is the special magic number for Tallinn?", "4817263"
)
LONG_NEEDLE = Needle(
    "The secret passphrase of the lighthouse keeper is amber falcon.",
    "What is the secret passphrase of the lighthouse keeper?",
    "amber falcon",
)
RUN_TIMEOUT_S = 600  # a real model on 2 CPU cores; the render itself is asserted separately


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    binary = next((path for path in map(shutil.which, BROWSERS) if path), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        pytest.skip(NO_BROWSER)
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    # --no-sandbox: CI runs as root; /dev/shm is small in containers.
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1500,1900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def open_viewer(browser: WebDriver, url: str) -> None:
    browser.get(f"{url}/viewer")
    WebDriverWait(browser, 30).until(lambda d: "connecting" not in status_text(d))


def status_text(browser: WebDriver) -> str:
    return browser.find_element(By.ID, "server-status").text


def fill_prompt(browser: WebDriver, context: str, question: str, key: str = "") -> None:
    # Long text through JS (send_keys types a key at a time), announced like typing would be.
    browser.execute_script(
        "const c = document.getElementById('context'); c.value = arguments[0];"
        "c.dispatchEvent(new Event('input'));"
        "const k = document.getElementById('api-key'); k.value = arguments[1];"
        "k.dispatchEvent(new Event('change'));",
        context,
        key,
    )
    question_box = browser.find_element(By.ID, "question")
    question_box.clear()
    question_box.send_keys(question)


def choose_lane(browser: WebDriver, lane: str, method: str, budget: int) -> None:
    browser.execute_script(
        "const m = document.getElementById(arguments[0]); m.value = arguments[1];"
        "m.dispatchEvent(new Event('change'));"
        "document.getElementById(arguments[2]).value = String(arguments[3]);",
        f"method-{lane}",
        method,
        f"budget-{lane}",
        budget,
    )


def set_compare(browser: WebDriver, on: bool) -> None:
    box = browser.find_element(By.ID, "compare")
    if box.is_selected() != on:
        box.click()


def run_and_wait(browser: WebDriver) -> None:
    """Click Run; wait for every run to end and every shown prompt to be rendered."""
    before = browser.execute_script("return Number(document.body.dataset.runs || 0)")
    browser.find_element(By.ID, "run").click()
    WebDriverWait(browser, RUN_TIMEOUT_S).until(
        lambda d: d.execute_script("return Number(document.body.dataset.runs || 0)") > before
    )


def wait_rendered(browser: WebDriver, lane: str, timeout: float = 60) -> float:
    """Wait for the lane's prompt to be wholly in the DOM; the seconds the page says drawing took."""
    prompt = browser.find_element(By.CSS_SELECTOR, f"#lane-{lane} .prompt")
    WebDriverWait(browser, timeout).until(lambda d: prompt.get_attribute("data-rendered") == "true")
    return float(prompt.get_attribute("data-render-ms")) / 1000.0


def lane_run(browser: WebDriver, lane: str) -> dict:
    """What the page received for a lane (its request body and final chunk)."""
    return browser.execute_script("return window.gemserveViewer.runs[arguments[0]]", lane)


def dom_spans(browser: WebDriver, lane: str, kept: bool) -> list[str]:
    """The text of each kept (or dropped) run as drawn: a long run is drawn in several pieces."""
    return browser.execute_script(
        "const runs = new Map();"
        "for (const el of document.querySelectorAll(`#lane-${arguments[0]} .prompt .seg.${arguments[1]}`)) {"
        "  runs.set(el.dataset.seg, (runs.get(el.dataset.seg) || '') + el.textContent); }"
        "return [...runs.values()];",
        lane,
        "kept" if kept else "dropped",
    )


def metric(browser: WebDriver, lane: str, key: str) -> str:
    return browser.find_element(By.CSS_SELECTOR, f'#lane-{lane} .metrics dd[data-key="{key}"]').text


def screenshot(browser: WebDriver, path: Path) -> None:
    browser.save_screenshot(str(path))
    assert path.stat().st_size > 10_000


# ---- the tests ---------------------------------------------------------------------------------
def test_without_the_key_the_page_says_401(browser, server_url_with_key, tmp_path) -> None:
    open_viewer(browser, server_url_with_key)
    assert "401" in status_text(browser) and "API key" in status_text(browser)
    fill_prompt(browser, "The sky was grey.", "What colour was the sky?")
    set_compare(browser, False)
    run_and_wait(browser)
    error = browser.find_element(By.ID, "error")
    assert error.is_displayed()
    assert "401" in error.text and "missing API key" in error.text and "Enter this server's API key" in error.text
    assert lane_run(browser, "a")["final"] is None
    # A wrong key is refused the same way, and the page keeps the key nowhere but in memory.
    fill_prompt(browser, "The sky was grey.", "What colour was the sky?", key="not-the-key")
    run_and_wait(browser)
    assert "invalid API key" in browser.find_element(By.ID, "error").text
    stored = browser.execute_script(
        "return [localStorage.length, sessionStorage.length, document.cookie, location.href]"
    )
    assert stored[:3] == [0, 0, ""] and "not-the-key" not in stored[3]
    screenshot(browser, tmp_path / "viewer_401.png")


def test_gemfilter_needle_side_by_side_with_pyramidkv(browser, server_url_with_key, count_tokens, tmp_path) -> None:
    case = build_case(1500, depth=0.45, seed=11, count_tokens=count_tokens, needle=NEEDLE)
    open_viewer(browser, server_url_with_key)
    fill_prompt(browser, case.document, NEEDLE.question, key=TEST_API_KEY)
    WebDriverWait(browser, 30).until(lambda d: status_text(d).startswith("Serving smollm2"))
    choose_lane(browser, "a", "gemfilter", 256)
    set_compare(browser, True)
    choose_lane(browser, "b", "pyramidkv", 256)
    run_and_wait(browser)
    for lane in "ab":
        wait_rendered(browser, lane)
    assert not browser.find_element(By.ID, "error").is_displayed()

    # A: GemFilter found the needle; the page shows the answer, the metrics and the kept spans.
    run_a = lane_run(browser, "a")
    answer = browser.find_element(By.CSS_SELECTOR, "#lane-a .answer").text
    assert NEEDLE.found_in(answer), answer
    assert answer.strip() == run_a["text"].strip()
    compression, metrics = run_a["final"]["compression"], run_a["final"]["metrics"]
    assert metric(browser, "a", "kept_tokens").startswith("256 (")
    assert metric(browser, "a", "ttft_ms") == f"{metrics['ttft_ms']:.0f} ms"
    assert metric(browser, "a", "method").startswith("gemfilter (filter layer ")
    selection = compression["selection"]
    assert dom_spans(browser, "a", kept=True) == [span["text"] for span in selection["spans"]]
    assert "".join(dom_spans(browser, "a", kept=True)) + "".join(dom_spans(browser, "a", kept=False)) != ""
    assert any(NEEDLE.answer in text for text in dom_spans(browser, "a", kept=True))
    # The same request, sent again outside the page, keeps the same spans (GemFilter is deterministic).
    again = httpx.post(
        f"{server_url_with_key}/v1/chat/completions",
        json={**run_a["body"], "stream": False},
        headers={"Authorization": f"Bearer {TEST_API_KEY}"},
        timeout=RUN_TIMEOUT_S,
    ).json()
    assert [s["text"] for s in again["compression"]["selection"]["spans"]] == dom_spans(browser, "a", kept=True)
    heat_a = browser.find_element(By.CSS_SELECTOR, "#lane-a .heat-canvas")
    assert heat_a.is_displayed()
    assert heat_a.get_attribute("data-bins") == str(len(selection["scores"]["values"]))
    assert heat_a.get_attribute("data-rows") == "1"

    # B: PyramidKV's cache per layer, one row each, and its own spans.
    run_b = lane_run(browser, "b")
    coverage = run_b["final"]["compression"]["selection"]["layer_coverage"]
    heat_b = browser.find_element(By.CSS_SELECTOR, "#lane-b .heat-canvas")
    assert heat_b.get_attribute("data-rows") == str(len(coverage["layers"])) == "30"
    assert dom_spans(browser, "b", kept=True) == [
        s["text"] for s in run_b["final"]["compression"]["selection"]["spans"]
    ]
    assert browser.find_element(By.CSS_SELECTOR, "#lane-b .answer").text.strip() == run_b["text"].strip()

    # The side-by-side table: both methods with their TTFT and KV bytes.
    rows = browser.find_elements(By.CSS_SELECTOR, "#comparison tbody tr")
    cells = [[td.text for td in row.find_elements(By.TAG_NAME, "td")] for row in rows]
    assert [row[:2] for row in cells] == [["A", "gemfilter"], ["B", "pyramidkv"]]
    for row, run in zip(cells, (run_a, run_b), strict=True):
        assert row[3] == f"{run['final']['metrics']['ttft_ms']:.0f}"
        assert row[6] == str(run["final"]["metrics"]["kv_cache_bytes"])
    screenshot(browser, tmp_path / "viewer_side_by_side.png")
    target = os.environ.get("GEMSERVE_VIEWER_SCREENSHOT")
    if target:
        browser.execute_script("window.scrollTo(0, 0)")
        shutil.copyfile(tmp_path / "viewer_side_by_side.png", target)


def test_a_32k_character_context_renders_in_chunks(browser, server_url, count_tokens, tmp_path) -> None:
    """About 7.5K tokens of haystack (32K+ characters): the whole prompt ends up in the DOM, drawn a
    piece at a time, and the tab keeps answering while it draws."""
    case = build_case(7500, depth=0.7, seed=5, count_tokens=count_tokens, needle=LONG_NEEDLE)
    assert len(case.document) >= 32_000
    open_viewer(browser, server_url)
    fill_prompt(browser, case.document, LONG_NEEDLE.question)
    set_compare(browser, False)
    choose_lane(browser, "a", "gemfilter", 1024)
    run_and_wait(browser)
    render_s = wait_rendered(browser, "a", timeout=60)
    assert not browser.find_element(By.ID, "error").is_displayed()
    drawn = browser.execute_script(
        "const els = document.querySelectorAll('#lane-a .prompt .seg');"
        "return [els.length, [...els].map(e => e.textContent).join('')];"
    )
    segments = lane_run(browser, "a")["final"]["compression"]["selection"]["segments"]
    assert drawn[1] == "".join(s["text"] for s in segments)
    assert case.document in drawn[1]
    # One element per run, plus one per 2000 characters of a longer run: bounded, not per token.
    assert len(segments) <= drawn[0] <= len(segments) + len(drawn[1]) // 2000 + 1
    frames = int(browser.find_element(By.CSS_SELECTOR, "#lane-a .prompt").get_attribute("data-frames"))
    assert frames >= math.ceil(len(drawn[1]) / 16_000)  # 16K characters per turn of the event loop
    assert browser.execute_script("return 1 + 1") == 2  # the page still answers
    print(f"32K-character prompt: {len(drawn[1])} characters, {drawn[0]} elements, {render_s:.2f} s, {frames} turns")
    screenshot(browser, tmp_path / "viewer_32k.png")


def test_a_32k_token_response_is_drawn_in_chunks(browser, server_url, tmp_path) -> None:
    """A 32K-token prompt is past this model's 8K context, so the page's own fetch is answered with a
    recorded-shape stream: 32768 tokens in 4096 kept and dropped runs (~150K characters), a 2048-bin
    score strip. Everything after fetch is the page's real path: SSE parsing, metrics, strip, text.
    Printed, not asserted: the longest gap of a 5 ms timer while the page drew."""
    open_viewer(browser, server_url)
    fill_prompt(browser, "stub", "stub")
    set_compare(browser, False)
    choose_lane(browser, "a", "gemfilter", 4096)
    n, runs = 32768, 4096
    browser.execute_script(
        """
        const [n, runs] = [arguments[0], arguments[1]];
        const per = n / runs;
        const segments = [];
        for (let i = 0; i < runs; i++) {
          const text = `run ${i} `.padEnd(i % 2 ? 50 : 24, i % 2 ? "." : "*") + "\\n";
          segments.push({start: i * per, end: (i + 1) * per, kept: i % 2 === 0, text});
        }
        const kept = segments.filter((s) => s.kept);
        const selection = {
          kept_indices: [], protected_tail: 32, segments,
          spans: kept.map(({start, end, text}) => ({start, end, text})),
          scores: {bin_tokens: 16, values: Array.from({length: 2048}, (_, i) => (i % 97) / 96)},
        };
        const final = {
          id: "chatcmpl-stub", object: "chat.completion.chunk", model: "stub",
          choices: [{index: 0, delta: {}, finish_reason: "stop"}],
          compression: {method: "gemfilter", prompt_tokens: n, kept_tokens: n / 2, ratio: 0.5, select_ms: 1,
                        layer: 18, selection},
          metrics: {queue_ms: 0, select_ms: 1, prefill_ms: 2, ttft_ms: 3, decode_ms: 4, e2e_ms: 5,
                    output_tokens_per_s: 6, kv_cache_bytes: 7, peak_memory_bytes: 8, memory_source: "stub"},
        };
        const events = [{choices: [{index: 0, delta: {role: "assistant", content: "stub answer"}}]}, final];
        const body = events.map((e) => `data: ${JSON.stringify(e)}\\n\\n`).join("") + "data: [DONE]\\n\\n";
        window.fetch = async () => new Response(body, {status: 200, headers: {"Content-Type": "text/event-stream"}});
        window.maxGap = 0;
        let last = performance.now();
        window.ticker = setInterval(() => {
          const now = performance.now();
          window.maxGap = Math.max(window.maxGap, now - last);
          last = now;
        }, 5);
        """,
        n,
        runs,
    )
    run_and_wait(browser)
    render_s = wait_rendered(browser, "a", timeout=60)
    max_gap_ms = browser.execute_script("clearInterval(window.ticker); return window.maxGap")
    assert not browser.find_element(By.ID, "error").is_displayed()
    assert browser.find_element(By.CSS_SELECTOR, "#lane-a .answer").text == "stub answer"
    selection = lane_run(browser, "a")["final"]["compression"]["selection"]
    drawn = browser.execute_script(
        "const els = document.querySelectorAll('#lane-a .prompt .seg');"
        "return [els.length, [...els].map(e => e.textContent).join('')];"
    )
    whole = "".join(s["text"] for s in selection["segments"])
    assert len(whole) > 140_000 and drawn[1] == whole
    assert drawn[0] == runs  # every run is shorter than a piece: one element each
    assert dom_spans(browser, "a", kept=True) == [s["text"] for s in selection["spans"]]
    frames = int(browser.find_element(By.CSS_SELECTOR, "#lane-a .prompt").get_attribute("data-frames"))
    assert frames >= math.ceil(len(whole) / 16_000)
    heat = browser.find_element(By.CSS_SELECTOR, "#lane-a .heat-canvas")
    assert heat.get_attribute("data-bins") == "2048"
    print(
        f"32K tokens: {len(whole)} characters, {drawn[0]} elements, {render_s:.2f} s, {frames} turns, "
        f"longest timer gap {max_gap_ms:.0f} ms"
    )
    screenshot(browser, tmp_path / "viewer_32k_tokens.png")
