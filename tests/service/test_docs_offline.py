"""/docs (Swagger UI) and /redoc render the API's operations in headless Chromium with every host
but the server's unresolvable: their scripts and styles come from the server itself (the files
the fastapi-offline package ships), and the browser asks no other host for anything."""

import json

import httpx
import pytest
from servicekit import free_port, headless_chromium, start_api, stop, wait_api_ready, wait_until

pytestmark = pytest.mark.timeout(240)

# every name resolves to nothing except the loopback address the server listens on
NO_NETWORK = "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"


@pytest.fixture(scope="module")
def service(model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("docs")
    port = free_port()
    api = start_api(port, model_dir, logs / "api.log")
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60)
    wait_api_ready(api, http, logs / "api.log", path="/healthz", what="the API to listen")
    yield {"base": f"http://127.0.0.1:{port}", "http": http, "logs": logs}
    http.close()
    stop(api)


@pytest.fixture
def browser(service, tmp_path):
    driver = headless_chromium(
        tmp_path / "profile", service["logs"] / "chromedriver.log", (NO_NETWORK,), performance_log=True
    )
    yield driver
    driver.quit()


def operations(http) -> set[tuple[str, str]]:
    paths = http.get("/openapi.json").json()["paths"]
    return {(method.upper(), path) for path, ops in paths.items() for method in ops}


def network_requests(driver) -> list[tuple[str, str | None]]:
    """(url, why the browser blocked it or None) of every request the page made, from the
    DevTools events (Network.requestWillBeSent, Network.loadingFailed)."""
    urls, blocked = {}, {}
    for entry in driver.get_log("performance"):
        msg = json.loads(entry["message"])["message"]
        params = msg.get("params", {})
        if msg["method"] == "Network.requestWillBeSent":
            urls[params["requestId"]] = params["request"]["url"]
        elif msg["method"] == "Network.loadingFailed" and params.get("blockedReason"):
            blocked[params["requestId"]] = params["blockedReason"]
    return [(url, blocked.get(rid)) for rid, url in urls.items()]


def assert_only_the_server(requests: list[tuple[str, str | None]], base: str) -> None:
    """Nothing went over the network but to the server: any other http(s) request was refused by
    the browser itself (the page's Content-Security-Policy) before it was sent. chrome:// pages
    are the browser's own."""
    network = [(u, why) for u, why in requests if u.startswith(("http:", "https:", "ws:", "wss:"))]
    foreign = [(u, why) for u, why in network if not u.startswith(base + "/") and why != "csp"]
    assert not foreign, f"the page asked other hosts: {foreign}"
    assert any(u.endswith(".js") for u, _ in network), network


def test_swagger_ui_renders_every_operation_offline(service, browser):
    want = operations(service["http"])
    assert ("POST", "/v1/generations") in want and len(want) >= 6
    browser.get(service["base"] + "/docs")
    wait_until(
        lambda: len(browser.find_elements("css selector", ".opblock")) >= len(want),
        60,
        "Swagger UI to render the operations",
        interval=0.2,
    )
    rendered = {
        (
            block.find_element("css selector", ".opblock-summary-method").text,
            block.find_element("css selector", ".opblock-summary-path").get_attribute("data-path"),
        )
        for block in browser.find_elements("css selector", ".opblock")
    }
    assert rendered == want
    assert browser.find_element("css selector", ".info .title").text.startswith("arcdiff")
    assert_only_the_server(network_requests(browser), service["base"])


def test_redoc_renders_every_operation_offline(service, browser):
    want = operations(service["http"])
    browser.get(service["base"] + "/redoc")
    wait_until(
        lambda: len(browser.find_elements("css selector", "[data-section-id^='operation/']")) >= len(want),
        60,
        "ReDoc to render the operations",
        interval=0.2,
    )
    text = browser.find_element("tag name", "body").text
    for summary in ("Generate images", "Read a generation", "List the served models"):
        assert summary in text
    assert_only_the_server(network_requests(browser), service["base"])
