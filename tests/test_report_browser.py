"""The report in a real browser: headless Chromium opens the file from disk and we use the viewer."""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest

from moescope.report.html import write_report
from moescope.report.viewer import expert_colors
from report_traces import GENERATED_FROM, HOSTILE, HOSTILE_TEXT, LAYERS, WHITESPACE, make_results, make_trace, top1

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} is not installed (apt-get install chromium)")

# Records alert() calls instead of opening a dialog, before any of the page's own script runs.
ALERT_TRAP = "window.__alerts = []; window.alert = function (m) { window.__alerts.push(String(m)); };"


@pytest.fixture(scope="module")
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-quic", "--window-size=1280,900"):
        options.add_argument(arg)
    profile = tempfile.TemporaryDirectory(prefix="moescope-chromium-")
    options.add_argument(f"--user-data-dir={profile.name}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: selenium-manager never runs, so nothing is downloaded.
    browser = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": ALERT_TRAP})
    yield browser
    browser.quit()
    profile.cleanup()


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    make_trace(root / "trace")
    make_results(root / "extra", "extra", trace="../trace", accuracy=0.9, chance_accuracy=0.25, note=HOSTILE_TEXT)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "moescope.analysis.stats", None)  # only the sections these tests expect
        return write_report([root], root / "report.html")


def load(driver, path: Path, *, bypass_csp: bool = False):
    """Open the report from disk; `bypass_csp` switches off its Content Security Policy."""
    # With the policy off, only escaping stands between token text and the HTML parser.
    driver.execute_cdp_cmd("Page.setBypassCSP", {"enabled": bypass_csp})
    driver.get(path.resolve().as_uri())
    assert driver.execute_script("return document.readyState") == "complete"


def console_errors(driver) -> list[dict]:
    return [entry for entry in driver.get_log("browser") if entry["level"] in ("SEVERE", "WARNING")]


def select(driver, css: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("css selector", css)).select_by_value(value)


def token_spans(driver):
    return driver.find_elements("css selector", ".tokens .tok")


def rgb(hex_colour: str) -> str:
    return "rgb({}, {}, {})".format(*(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)))


def test_viewer_draws_tokens_and_recolours_by_layer(driver, report):
    load(driver, report)
    colours = expert_colors(8)
    assert len(token_spans(driver)) == len(HOSTILE)
    select(driver, ".seq-select", "2")  # the long sequence
    assert len(token_spans(driver)) == 30
    for value, layer_index in ((str(LAYERS[1]), 1), (str(LAYERS[0]), 0)):
        select(driver, ".layer-select", value)
        seen = driver.execute_script(
            "return Array.from(document.querySelectorAll('.tokens .tok'), s => getComputedStyle(s).backgroundColor)")
        assert seen == [rgb(colours[top1(2, pos, layer_index)]) for pos in range(30)]
    assert console_errors(driver) == []


def test_hover_shows_experts_weights_and_phase(driver, report):
    from selenium.webdriver.common.action_chains import ActionChains

    load(driver, report)
    select(driver, ".seq-select", "1")
    select(driver, ".layer-select", str(LAYERS[1]))
    tooltip = driver.find_element("css selector", ".tooltip")
    assert not tooltip.is_displayed()
    for pos, phase in ((GENERATED_FROM + 1, "generated"), (2, "prompt")):
        span = token_spans(driver)[pos]
        ActionChains(driver).move_to_element(span).perform()
        assert tooltip.is_displayed()
        rows = driver.execute_script(
            "return Array.from(document.querySelectorAll('.tooltip tr'), r => Array.from(r.cells, c => c.textContent))")
        first = top1(1, pos, 1)
        assert rows == [[f"expert {first}", "0.625", ""], [f"expert {(first + 2) % 8}", "0.375", ""]]
        meta = driver.find_element("css selector", ".tip-meta").text
        assert meta == f"pos {pos} · token id {100 + pos} · {phase}"
        assert "layer 3 · top-2 experts" in tooltip.text
        box = driver.execute_script("return arguments[0].getBoundingClientRect().toJSON()", tooltip)
        assert box["left"] >= 0 and box["top"] >= 0 and box["right"] <= 1280  # inside the window
    ActionChains(driver).move_to_element(driver.find_element("css selector", "h1")).perform()
    assert not tooltip.is_displayed()
    assert console_errors(driver) == []


def test_keyboard_focus_and_click_pin_the_tooltip(driver, report):
    from selenium.webdriver.common.keys import Keys

    load(driver, report)
    spans = token_spans(driver)
    tooltip = driver.find_element("css selector", ".tooltip")
    layer = driver.find_element("css selector", ".layer-select")
    layer.send_keys(Keys.TAB)  # from the layer selector, Tab enters the tokens
    assert tooltip.is_displayed() and "pos 0 · token id 0" in tooltip.text
    driver.switch_to.active_element.send_keys(Keys.TAB)
    assert "pos 1 · token id 1" in tooltip.text
    driver.switch_to.active_element.send_keys(Keys.SHIFT, Keys.TAB)
    driver.switch_to.active_element.send_keys(Keys.SHIFT, Keys.TAB)  # back on the layer selector
    assert not tooltip.is_displayed()
    spans[5].click()  # a tap on a touch screen
    assert tooltip.is_displayed() and "pinned" in spans[5].get_attribute("class")
    spans[5].send_keys(Keys.ESCAPE)
    assert not tooltip.is_displayed()


def test_generated_and_whitespace_tokens_are_visible(driver, report):
    load(driver, report)
    select(driver, ".seq-select", "1")
    spans = token_spans(driver)
    texts = driver.execute_script("return Array.from(arguments[0], s => s.textContent)", spans)
    assert texts == WHITESPACE  # newlines and leading spaces kept as they are
    assert ["gen" in s.get_attribute("class") for s in spans] == [i >= GENERATED_FROM for i in range(len(spans))]
    assert len(driver.find_elements("css selector", ".tokens .gen-start")) == 1
    tops = [s.rect["y"] for s in spans]
    assert tops[4] > tops[2]  # "    " follows a "\n" token: it starts a new line
    assert spans[4].rect["width"] > 20  # four leading spaces take room
    assert spans[8].rect["width"] > 0  # the empty token shows a placeholder


def test_hostile_text_appears_literally_and_runs_nothing(driver, report):
    load(driver, report, bypass_csp=True)
    texts = driver.execute_script("return Array.from(document.querySelectorAll('.tokens .tok'), s => s.textContent)")
    assert texts == HOSTILE
    option = driver.find_element("css selector", ".seq-select option").get_attribute("textContent")
    assert HOSTILE_TEXT[:30] in option
    assert driver.execute_script("return window.__alerts") == []
    scripts = driver.execute_script(
        "return Array.from(document.scripts, s => s.type + '|' + s.className)")
    assert scripts == ["application/json|viewer-data", "|"]
    assert driver.execute_script("return document.querySelectorAll('[onerror]').length") == 0
    assert len(driver.find_elements("css selector", "img")) == 1  # the one figure
    cell = driver.execute_script(
        "return Array.from(document.querySelectorAll('.values td'), td => td.textContent)")
    assert HOSTILE_TEXT in cell
    assert console_errors(driver) == []


def test_no_network_requests(driver, report):
    load(driver, report)
    urls = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert all(u.startswith(("data:", "file:")) for u in urls), urls
    assert console_errors(driver) == []  # nothing the Content Security Policy had to block


def test_weights_not_recorded(driver, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    path = write_report([make_trace(tmp_path / "t", weights=False)], tmp_path / "r.html")
    load(driver, path)
    ActionChains(driver).move_to_element(token_spans(driver)[0]).perform()
    tooltip = driver.find_element("css selector", ".tooltip")
    assert "weights not recorded" in tooltip.text
    assert [r[1] for r in driver.execute_script(
        "return Array.from(document.querySelectorAll('.tooltip tr'), r => Array.from(r.cells, c => c.textContent))")] \
        == ["–", "–"]
    assert console_errors(driver) == []
