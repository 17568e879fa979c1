"""The browser demo in real headless Chromium (Debian's, driven by Playwright) against a live server running the
real default model, greedy, so that steps end and the history fills in within a few tokens."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_server import LiveServer, metric_values, wait_for_sessions
from playwright.sync_api import Browser, Page, Route, expect, sync_playwright

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]
API_KEY = "web-test-key"
ARTIFACTS = Path(__file__).parent / "artifacts"
RUN_TIMEOUT_MS = 180_000


@pytest.fixture(scope="module")
def server(default_model_dir: Path) -> Iterator[str]:
    env = {
        "HOGWILD_MODEL": str(default_model_dir),
        "HOGWILD_DEVICE": "cpu",
        "HOGWILD_API_KEY": API_KEY,
        "HOGWILD_MAX_TOKENS": "2000",
    }
    with LiveServer(env, []) as url:
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(server: str, browser: Browser) -> Iterator[Page]:
    """The demo, loaded, with an idle engine; uncaught page errors fail the test."""
    wait_for_sessions(server, running=0)
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(server + "/")
    yield page
    context.close()
    assert errors == [], f"uncaught errors in the page: {errors}"


PARAGRAPHS_TASK = "Write three short sentences about the sea, each as its own paragraph."  # steps end early


def fill(page: Page, *, key: str = API_KEY, **fields: object) -> None:
    page.locator("details.advanced summary").click()
    page.fill("#api_key", key)
    for name, value in fields.items():
        page.fill(f"#{name}", str(value))


def wait_until_not_running(page: Page) -> str:
    page.wait_for_function("document.body.dataset.state !== 'running'", timeout=RUN_TIMEOUT_MS)
    return page.evaluate("document.body.dataset.state")


def test_page_loads_with_labelled_form_and_ready_server(page: Page) -> None:
    expect(page).to_have_title("Hogwild! Inference — live demo")
    for field in ("prompt", "workers", "max_tokens", "temperature", "redundancy_check_every", "seed", "api_key"):
        assert page.locator(f"label[for='{field}']").count() == 1, f"{field} has a label"
    expect(page.locator("#server-text")).to_contain_text("SmolLM2-135M-Instruct · ready")
    expect(page.locator("#start")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()


def test_three_workers_fill_their_lanes_and_the_shared_history(page: Page) -> None:
    fill(page, prompt=PARAGRAPHS_TASK, workers=3, max_tokens=24, temperature=0)
    page.click("#start")
    lanes = page.locator("#lanes .lane")
    expect(lanes).to_have_count(3)
    assert wait_until_not_running(page) == "done"
    assert lanes.locator("h3").all_inner_texts() == ["Alice", "Bob", "Carol"]
    for index in range(3):
        lane = lanes.nth(index)
        expect(lane).to_have_attribute("data-finish", "length")
    history = page.locator("#history .step")
    assert history.count() >= 3, "each worker's short greeting step ends and moves into the history"
    names = history.locator(".tag .name").all_inner_texts()
    assert set(names) == {"Alice", "Bob", "Carol"}
    for index in range(history.count()):
        step = history.nth(index)
        worker = int(step.get_attribute("data-worker") or -1)
        assert f"w{worker}" in (step.get_attribute("class") or ""), "each step carries its worker's colour"
        assert step.locator(".ins-header").count() == 1 and step.locator(".sample").count() >= 1
    assert page.locator(".ins-finisher").count() >= 1, "the budget ran out: the finisher's text is marked"
    expect(page.locator("#answer")).to_be_visible()
    assert page.inner_text("#answer-text").strip()
    assert int(page.inner_text("#stat-steps")) == history.count()
    counts = [int(count) for count in lanes.locator(".count").all_inner_texts()]
    assert counts[1:] == [24, 24] and counts[0] > 24, "worker 0 also wrote the finisher's answer, past its budget"
    assert int(page.inner_text("#stat-tokens")) == sum(counts), "the usage chunk gives the exact count"
    assert float(page.inner_text("#stat-rate")) > 0
    prompt, cached = (int(part) for part in page.inner_text("#stat-prompt").split(" · "))
    assert prompt > 0 and 0 <= cached < prompt
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-run.png"), full_page=True)

    page.click("#start")  # the same task again: the server's prefix cache supplies all but its end
    assert wait_until_not_running(page) == "done"
    again, cached_again = (int(part) for part in page.inner_text("#stat-prompt").split(" · "))
    assert again == prompt and cached < cached_again < prompt


def test_lanes_grow_while_the_run_streams(page: Page) -> None:
    fill(page, workers=3, max_tokens=1500, temperature=0)
    page.click("#start")
    for index in range(3):
        expect(page.locator(f"#lanes .lane[data-worker='{index}'] .sample").first).not_to_be_empty(timeout=60_000)
    tokens_before = int(page.inner_text("#stat-tokens"))
    page.wait_for_function(f"Number(document.getElementById('stat-tokens').textContent) > {tokens_before}")
    expect(page.locator("#stop")).to_be_enabled()


def test_stop_ends_the_stream_and_the_server_cancels_the_session(server: str, page: Page) -> None:
    fill(page, workers=2, max_tokens=1500, temperature=0)
    page.click("#start")
    expect(page.locator("#lanes .lane .sample").first).not_to_be_empty(timeout=60_000)
    wait_for_sessions(server, running=1)
    cancelled = 'hogwild_requests_total{outcome="cancelled"}'
    before = metric_values(httpx.get(f"{server}/metrics").text).get(cancelled, 0)
    page.click("#stop")
    assert page.evaluate("document.body.dataset.state") == "stopped"
    expect(page.locator("#lanes .lane[data-finish='abort']")).to_have_count(2)
    wait_for_sessions(server, running=0, timeout=10.0)
    values = metric_values(httpx.get(f"{server}/metrics").text)
    assert values[cancelled] == before + 1 and values["hogwild_kv_cache_bytes"] == 0
    tokens = page.inner_text("#stat-tokens")
    page.wait_for_timeout(500)
    assert page.inner_text("#stat-tokens") == tokens, "nothing arrives after Stop"


def test_enter_submits_and_invalid_input_shows_the_servers_message(page: Page) -> None:
    fill(page, workers=12)
    page.focus("#prompt")
    page.keyboard.press("Enter")
    assert wait_until_not_running(page) == "error"
    expect(page.locator("#error")).to_contain_text("workers must be between 1 and")
    expect(page.locator("#error")).to_contain_text("HTTP 400")
    expect(page.locator("#workers")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#workers")).to_be_focused()


def test_missing_api_key_is_shown_and_points_at_the_key_field(page: Page) -> None:
    fill(page, key="", max_tokens=4)
    page.click("#start")
    assert wait_until_not_running(page) == "error"
    expect(page.locator("#error")).to_contain_text("HTTP 401")
    expect(page.locator("#api_key")).to_be_focused()


def test_busy_server_and_lost_connection_are_shown(page: Page) -> None:
    busy = {"error": {"message": "the queue is full", "type": "server_error", "param": None, "code": "queue_full"}}

    def answer_busy(route: Route) -> None:
        route.fulfill(status=503, json=busy, headers={"Retry-After": "3"})

    page.route("**/v1/hogwild/completions", answer_busy)
    fill(page, max_tokens=4)
    page.click("#start")
    assert wait_until_not_running(page) == "error"
    expect(page.locator("#error")).to_contain_text("the queue is full. Try again in 3 s. (HTTP 503)")

    chunk = {"choices": [{"index": 0, "text": "Hel"}], "hogwild": {"worker": 0, "name": "Alice", "kind": "token"}}
    cut_short = f'data: {json.dumps(chunk)}\n\ndata: {{"choi'

    def answer_cut_short(route: Route) -> None:
        route.fulfill(status=200, body=cut_short, headers={"Content-Type": "text/event-stream"})

    page.unroute("**/v1/hogwild/completions")
    page.route("**/v1/hogwild/completions", answer_cut_short)
    page.click("#start")
    assert wait_until_not_running(page) == "error"
    expect(page.locator("#error")).to_contain_text("Connection lost")
    expect(page.locator("#lanes .lane[data-worker='0'] .lane-text")).to_have_text("Hel")


def test_a_run_the_server_aborts_is_shown_as_stopped_not_finished(page: Page) -> None:
    """A server that shuts down ends its sessions with finish_reason "abort", then [DONE]."""

    def chunk(worker: int, kind: str, text: str = "", finish_reason: str | None = None) -> str:
        choice = {"index": worker, "text": text, "finish_reason": finish_reason}
        hogwild = {"worker": worker, "name": ("Alice", "Bob")[worker], "kind": kind}
        return f"data: {json.dumps({'choices': [choice], 'hogwild': hogwild})}\n\n"

    finishes = [chunk(worker, "finish", finish_reason="abort") for worker in (0, 1)]
    body = chunk(0, "token", "Hi") + "".join(finishes) + "data: [DONE]\n\n"

    def answer_aborted(route: Route) -> None:
        route.fulfill(status=200, body=body, headers={"Content-Type": "text/event-stream"})

    page.route("**/v1/hogwild/completions", answer_aborted)
    fill(page, workers=2, max_tokens=4)
    page.click("#start")
    assert wait_until_not_running(page) == "stopped"
    expect(page.locator("#stat-status")).to_have_text("stopped by the server")


def test_the_server_indicator_follows_the_server_after_it_was_ready(page: Page) -> None:
    expect(page.locator("#server-text")).to_contain_text("· ready")
    down = {"status": "down", "model": None, "message": "the engine process was killed by SIGKILL; restarting"}
    page.route("**/health", lambda route: route.fulfill(status=503, json=down))
    expect(page.locator("#server-text")).to_have_text("engine restarting…", timeout=15_000)
    expect(page.locator("#server")).to_have_attribute("data-health", "loading")
    # The new engine loads its model: "down" lasts milliseconds, this the whole load. Still a restart.
    loading = {"status": "loading", "model": None, "message": "loading weights"}
    page.unroute("**/health")
    page.route("**/health", lambda route: route.fulfill(status=503, json=loading))
    page.wait_for_timeout(2500)  # one poll while not ready (every 2 s) has seen it
    expect(page.locator("#server-text")).to_have_text("engine restarting…")
    page.unroute("**/health")
    expect(page.locator("#server-text")).to_contain_text("· ready", timeout=15_000)


def test_sse_parser_keeps_partial_events_across_reads(page: Page) -> None:
    payloads = page.evaluate(
        """async () => {
            const { SSEParser } = await import('./sse.js');
            const bytes = new TextEncoder().encode(
                ': ping\\r\\n\\r\\ndata: {"a":"漢"}\\r\\n\\r\\ndata: x\\ndata: y\\r\\rdata: [DONE]\\n\\n');
            const parser = new SSEParser();
            const out = [];
            for (const byte of bytes) out.push(...parser.feed(new Uint8Array([byte])));
            return out;
        }"""
    )
    assert payloads == ['{"a":"漢"}', "x\ny", "[DONE]"]


def test_page_fits_a_phone_screen(server: str, browser: Browser) -> None:
    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    page.goto(server + "/")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390, "no sideways scrolling"
    box = page.locator("#prompt").bounding_box()
    assert box is not None and box["width"] > 300, "the task box uses the screen's width"
    context.close()


@pytest.mark.parametrize("width", [375, 1024])
def test_counters_show_in_full_after_a_run_on_narrow_screens(server: str, browser: Browser, width: int) -> None:
    """"prompt · cached" (e.g. "292 · 224") is the widest counter: it wraps rather than being cut to "292 · …"."""
    wait_for_sessions(server, running=0)
    context = browser.new_context(viewport={"width": width, "height": 900})
    page = context.new_page()
    page.goto(server + "/")
    fill(page, workers=2, max_tokens=4, temperature=0)
    page.click("#start")
    assert wait_until_not_running(page) == "done"
    assert " · " in page.inner_text("#stat-prompt")
    clipped = page.evaluate(
        """() => [...document.querySelectorAll('.stats dd')]
            .filter((dd) => dd.scrollWidth > dd.clientWidth).map((dd) => `${dd.id}: ${dd.textContent}`)"""
    )
    context.close()
    assert clipped == []


def test_a_mistyped_number_or_an_unsendable_key_is_refused_before_sending(page: Page) -> None:
    """A number field holding "5e" reads as empty, which would silently send the server's default; a key with a
    typographic apostrophe cannot be an HTTP header. Both are named, marked and focused; nothing is sent."""
    sent: list[str] = []
    page.on("request", lambda request: sent.append(request.url) if "completions" in request.url else None)
    fill(page, max_tokens=4)
    page.focus("#workers")
    page.keyboard.press("Control+A")
    page.keyboard.type("5e")
    page.click("#start")
    expect(page.locator("#error")).to_have_text("Workers: not a number")
    expect(page.locator("#workers")).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#workers")).to_be_focused()
    page.fill("#workers", "2")
    page.fill("#api_key", "sekrit\u2019")
    page.click("#start")
    expect(page.locator("#error")).to_contain_text("API key: only printable ASCII")
    expect(page.locator("#api_key")).to_be_focused()
    assert sent == [] and page.locator("#lanes .lane").count() == 0
    page.fill("#api_key", API_KEY)
    page.click("#start")
    assert wait_until_not_running(page) == "done" and len(sent) == 1
    expect(page.locator("#error")).to_be_hidden()
