"""The side-by-side page at `/`, in a real browser: Debian's headless Chromium driven over
WebDriver (selenium), against one daemon serving two real models (SmolLM2 and Qwen2.5) with an
API key. The page asks for the key, one prompt streams into both columns with live stats, Stop
aborts both (the server's /stats then shows no running sequence and every KV block free), a
follow-up continues each column's conversation, an answer made of HTML shows as text, the export
holds what was shown, and the page fits a phone-width screen. Screenshots are saved to target/.

scripts/test.sh installs chromium and chromium-driver (scripts/install-system-deps.sh)."""
import json
import os
import shutil
import time

import pytest
import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from conftest import API_KEY, ROOT, Daemon

MODELS = ("smol", "qwen")
SCREENSHOTS = ROOT / "target"


@pytest.fixture(scope="module")
def two_models(tmp_path_factory):
    cfg = tmp_path_factory.mktemp("page") / "two-models.toml"
    cfg.write_text(f"""
[[models]]
path = "{ROOT / 'models' / 'SmolLM2-135M-Instruct.Q4_1.gguf'}"
served_model_name = "smol"
[models.engine]
kv_cache_memory = "64MiB"
max_model_len = 2048

[[models]]
path = "{ROOT / 'models' / 'qwen2.5-coder-0.5b-instruct-q4_k_m.gguf'}"
served_model_name = "qwen"
[models.engine]
kv_cache_memory = "128MiB"
max_model_len = 2048
""")
    d = Daemon(None, "page", "--config", str(cfg))
    yield d
    d.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "chromium/chromedriver missing: scripts/install-system-deps.sh"
    os.environ["SE_OFFLINE"] = "true"  # never let selenium look for drivers online
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-dev-shm-usage", "--window-size=1400,1000",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    b = webdriver.Chrome(service=Service(driver), options=opts)
    b.set_script_timeout(30)
    yield b
    b.quit()


def wait(predicate, what: str, within: float = 120):
    deadline = time.time() + within
    while True:
        value = predicate()
        if value:
            return value
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def column(browser, model):
    return browser.find_element(By.CSS_SELECTOR, f'.column[data-model="{model}"]')


def stat(browser, model, name):
    return column(browser, model).find_element(By.CSS_SELECTOR, f'[data-stat="{name}"]').text


def answers(browser, model):
    return column(browser, model).find_elements(By.CSS_SELECTOR, ".answer")


def ask(browser, prompt: str, max_tokens: int):
    if not browser.find_element(By.ID, "settings").get_attribute("open"):
        browser.find_element(By.CSS_SELECTOR, "#settings summary").click()
    box = browser.find_element(By.ID, "max-tokens")
    box.clear()
    box.send_keys(str(max_tokens))
    browser.find_element(By.ID, "prompt").send_keys(prompt)
    browser.find_element(By.ID, "send").click()


def finished(browser):
    return all(stat(browser, m, "finish") not in ("–", "…") for m in MODELS) \
        and browser.find_element(By.ID, "send").is_enabled()


def engine_stats(daemon, model):
    r = requests.get(daemon.base + "/stats", headers={"Authorization": f"Bearer {API_KEY}"},
                     timeout=10)
    return next(m["engine"] for m in r.json()["models"] if m["model"] == model)


def test_page_is_served_with_a_strict_content_security_policy(two_models):
    r = requests.get(two_models.base + "/", timeout=10)  # open with --api-key: it holds no data
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert "<script>" not in r.text, "no inline script"
    for asset, kind in (("/ui/app.js", "text/javascript"), ("/ui/app.css", "text/css")):
        r = requests.get(two_models.base + asset, timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind)
    assert requests.get(two_models.base + "/v1/models", timeout=10).status_code == 401


def test_the_page_asks_for_the_key_then_shows_both_models(two_models, browser):
    browser.get(two_models.base + "/")
    dialog = browser.find_element(By.ID, "key-dialog")
    wait(lambda: dialog.get_attribute("open") is not None, "the key prompt")
    browser.find_element(By.ID, "key-input").send_keys("sk-wrong")
    browser.find_element(By.ID, "key-save").click()
    wait(lambda: "refused" in browser.find_element(By.ID, "key-error").text, "the refusal")
    browser.find_element(By.ID, "key-input").send_keys(API_KEY)
    browser.find_element(By.ID, "key-save").click()
    wait(lambda: len(browser.find_elements(By.CSS_SELECTOR, "#models input")) == 2, "models")
    assert dialog.get_attribute("open") is None
    ticks = browser.find_elements(By.CSS_SELECTOR, "#models input")
    assert {t.get_attribute("value") for t in ticks} == set(MODELS)
    assert all(t.is_selected() for t in ticks)
    assert browser.execute_script("return sessionStorage.getItem('inferd-api-key')") == API_KEY
    assert browser.execute_script("return localStorage.length") == 0, "the key stays in the tab"


def test_one_prompt_streams_into_both_columns_and_stop_aborts_both(two_models, browser):
    ask(browser, "Write a very long story about a lighthouse keeper and the sea.", 1500)
    # Live: both columns show text and a running token count before anything has finished.
    wait(lambda: all(stat(browser, m, "finish") == "…" and int(stat(browser, m, "tokens")) >= 3
                     for m in MODELS), "both columns streaming")
    for m in MODELS:
        assert answers(browser, m)[-1].text.strip(), m
        assert stat(browser, m, "ttft").endswith(" s")
    browser.save_screenshot(str(SCREENSHOTS / "page-streaming.png"))
    browser.find_element(By.ID, "stop").click()
    wait(lambda: finished(browser), "both columns stopped")
    assert {stat(browser, m, "finish") for m in MODELS} == {"stopped"}
    for m in MODELS:
        s = wait(lambda: (lambda e: e if e["num_running"] == 0 and e["num_waiting"] == 0
                          and e["num_free_blocks"] == e["num_total_blocks"] else None)(
            engine_stats(two_models, m)), f"{m} to free its blocks", within=60)
        assert s["generation_tokens"] < 1500, f"{m} ran to its end: {s}"


def test_a_follow_up_continues_each_columns_conversation(two_models, browser):
    browser.find_element(By.ID, "new-chat").click()
    ask(browser, "My name is Ada. Reply with one short sentence.", 24)
    wait(lambda: finished(browser), "the first turn")
    ask(browser, "What is my name?", 24)
    wait(lambda: finished(browser), "the follow-up")
    data = browser.execute_script("return window.inferd.comparison()")
    assert [m["model"] for m in data["models"]] == list(MODELS)
    for m in data["models"]:
        assert [t["prompt"] for t in m["turns"]] == [
            "My name is Ada. Reply with one short sentence.", "What is my name?"]
        for t in m["turns"]:
            assert t["answer"].strip() and t["tokens"] > 0
            assert t["finish_reason"] in ("stop", "length")
            assert t["ttft_s"] > 0
        shown = [a.text for a in answers(browser, m["model"])]
        assert len(shown) == 2
    markdown = browser.execute_script("return window.inferd.asMarkdown(window.inferd.comparison())")
    assert "## Turn 2" in markdown and "### smol" in markdown and "### qwen" in markdown
    for m in data["models"]:
        assert m["turns"][1]["answer"].strip() in markdown
    json.dumps(data)  # the JSON export is this object
    browser.save_screenshot(str(SCREENSHOTS / "page-desktop.png"))


def test_an_answer_made_of_html_shows_as_text(two_models, browser):
    payload = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script><b>bold</b>'
    # The models are made to answer exactly this through constrained decoding (vLLM's
    # structured_outputs), added to the page's own requests: real output, real stream.
    browser.execute_script("""
        const payload = arguments[0];
        const original = window.fetch;
        window.fetch = (url, init) => {
          if (String(url).endsWith('/v1/chat/completions')) {
            const body = JSON.parse(init.body);
            body.structured_outputs = {choice: [payload]};
            init = {...init, body: JSON.stringify(body)};
          }
          return original(url, init);
        };""", payload)
    browser.find_element(By.ID, "new-chat").click()
    ask(browser, "Show me some HTML.", 200)
    wait(lambda: finished(browser), "the HTML answers")
    for m in MODELS:
        [answer] = answers(browser, m)
        assert payload in answer.text, (m, answer.text)
        for tag in ("img", "script", "b"):
            assert not answer.find_elements(By.TAG_NAME, tag), f"{m}: a <{tag}> element"
    assert browser.execute_script("return window.pwned") is None


def test_the_page_fits_a_phone_width_screen(two_models, browser):
    browser.set_window_size(390, 844)
    browser.get(two_models.base + "/")  # the key is still in this tab's sessionStorage
    wait(lambda: len(browser.find_elements(By.CSS_SELECTOR, ".column")) == 2, "columns")
    ask(browser, "Say hi.", 8)
    wait(lambda: finished(browser), "the answers")
    overflow = browser.execute_script(
        "return document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"{overflow}px wider than the screen"
    widths = browser.execute_script(
        "return [...document.querySelectorAll('.column')].map(c => c.getBoundingClientRect().width)")
    assert all(w <= 390 for w in widths), widths
    browser.save_screenshot(str(SCREENSHOTS / "page-phone.png"))
    errors = [l for l in browser.get_log("browser") if l["level"] == "SEVERE"
              and "favicon" not in l["message"] and "401" not in l["message"]]
    assert not errors, errors
