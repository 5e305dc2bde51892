"""The playground follows a long generation in a real headless browser: its progress bar moves, the
x0_hat previews sharpen, and its Cancel button stops it (the same `arcdiff serve` set-up as
test_playground.py: embedded mode, API keys on, so the event stream must carry the key)."""

import pytest
from selenium.webdriver.support.select import Select
from servicekit import wait_until
from test_playground import KEY, browser, generate, js, service, set_value, wait_for  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(240)


def test_progress_previews_and_cancel_in_a_real_browser(service, browser, tmp_path):  # noqa: F811
    driver, http, model = browser, service["http"], service["model"]
    auth = {"Authorization": f"Bearer {KEY}"}
    driver.get(service["base"] + "/")
    js(driver, "sessionStorage.setItem('arcdiff-api-key', arguments[0])", KEY)
    driver.refresh()
    wait_for(driver, "return document.getElementById('model').options.length > 0", "the model list", 30)

    Select(driver.find_element("id", "model")).select_by_value(model)
    set_value(driver, "steps", 1000)
    Select(driver.find_element("id", "solver")).select_by_value("rk4")
    set_value(driver, "seed", 3)
    set_value(driver, "n", 2)
    driver.find_element("id", "generate").click()
    card = wait_until(lambda: driver.find_elements("css selector", "article.run"), 10, "a result card")[0]
    gen_id = card.get_attribute("data-id")

    state = """const c = arguments[0]; const p = c.querySelector('progress');
               return {value: p ? p.value : null, max: p ? p.max : null, status: c.dataset.status,
                       previews: [...c.querySelectorAll('img.preview')].map((i) => [i.dataset.nfe, i.src])};"""
    first = wait_until(
        lambda: (s := js(driver, state, card))["value"] and len(s["previews"]) == 2 and s,
        60,
        "progress and two previews",
        0.05,
    )
    assert first["max"] == 8000 and first["status"] == "running"
    later = wait_until(
        lambda: (
            (s := js(driver, state, card))["value"] > first["value"]
            and all(int(b[0]) > int(a[0]) for a, b in zip(first["previews"], s["previews"], strict=True))
            and s
        ),
        60,
        "the bar to move and newer previews",
        0.05,
    )
    assert [p[1] for p in later["previews"]] != [p[1] for p in first["previews"]], "previews did not change"
    assert "%" in card.find_element("css selector", ".status").text
    assert driver.save_screenshot(str(tmp_path / "running.png"))
    print(f"screenshot: {tmp_path / 'running.png'}")

    card.find_element("css selector", "button.cancel").click()
    wait_until(lambda: card.get_attribute("data-status") == "canceled", 30, "the card to show canceled", 0.05)
    body = http.get(f"/v1/generations/{gen_id}", headers=auth).json()
    assert body["status"] == "canceled"
    assert card.find_element("css selector", ".status").text == "canceled"
    assert not card.find_elements("css selector", "button.cancel")
    assert len(card.find_elements("css selector", "img.preview")) == 2  # where it was when it stopped
    assert js(driver, state, card)["value"] < 8000

    generate(driver, model, 2, "euler", 5, 1)  # the service goes on
    errors = [
        e["message"]
        for e in driver.get_log("browser")
        if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]
    ]
    assert not errors, errors
