"""The chat page in a real browser: headless Chromium (Debian's package) driven by Selenium.

`make test` installs chromium and chromium-driver with apt when they are missing (root with apt-get);
nothing here downloads a browser. Where neither can be had the test is skipped, saying why.
"""
from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from gptlab.generate import generate_text
from gptlab.prompts import get_prompt_style
from gptlab.serve import BackgroundServer, ServedModel, create_app

webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium (the dev extra)")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver") or (
    "/usr/bin/chromedriver" if os.path.exists("/usr/bin/chromedriver") else None)
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs chromium and chromedriver: `make browser-deps` (apt) installs them")
KEY = "browser-key"
SEED = 5


@pytest.fixture(scope="module")
def served(tiny_lm_run):
    return ServedModel.load(tiny_lm_run)


@pytest.fixture(scope="module")
def server(served):
    with BackgroundServer(create_app(served, api_key=KEY)) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="gptlab-chromium-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def set_value(driver, element_id: str, value) -> None:
    """Set a form control as a user would, firing the events the page listens to."""
    driver.execute_script(
        "const el = document.getElementById(arguments[0]); el.value = arguments[1];"
        "el.dispatchEvent(new Event('input')); el.dispatchEvent(new Event('change'));", element_id, str(value))


def send_and_wait(driver, text: str):
    before = len(driver.find_elements(By.CSS_SELECTOR, ".msg.assistant"))
    box = driver.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(text)
    driver.find_element(By.ID, "send").click()
    wait = WebDriverWait(driver, 30)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant")) > before)
    reply = driver.find_elements(By.CSS_SELECTOR, ".msg.assistant")[-1]
    wait.until(lambda d: reply.get_attribute("data-done") == "true")
    assert not driver.find_elements(By.CSS_SELECTOR, ".msg.error"), \
        driver.find_element(By.CSS_SELECTOR, ".msg.error").text
    return reply


def reply_text(driver, reply) -> str:
    return driver.execute_script("return arguments[0].textContent", reply)  # exact, unlike .text's normalising


def test_chat_page_streams_replies_keeps_and_clears_the_conversation(browser, server, served):
    style = get_prompt_style("alpaca")
    browser.get(server.url + "/")
    assert browser.title == "gptlab chat"
    set_value(browser, "api-key", KEY)  # the server wants a key: the page asks for it, then loads the model
    WebDriverWait(browser, 15).until(lambda d: "tiny-lm" in d.find_element(By.ID, "model").text)
    assert "alpaca" in browser.find_element(By.ID, "model").text
    set_value(browser, "mode", "chat")
    set_value(browser, "temperature", 1)
    set_value(browser, "top-p", 1)
    set_value(browser, "seed", SEED)
    set_value(browser, "max-tokens", 24)

    def expected(messages) -> str:
        return generate_text(served.model, served.tokenizer, style.chat(messages), 24, temperature=1.0, top_p=1.0,
                             seed=SEED, stop=style.stop)

    # Record every change to the reply's text, to see it grow piece by piece rather than appear at once.
    browser.execute_script("""
        window.__lengths = [];
        new MutationObserver(() => {
            const last = [...document.querySelectorAll('.msg.assistant')].pop();
            if (last) window.__lengths.push(last.textContent.length);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    """)
    first_user = "Give me a word."
    reply = send_and_wait(browser, first_user)
    first_answer = expected([{"role": "user", "content": first_user}])
    assert reply_text(browser, reply) == first_answer
    assert int(reply.get_attribute("data-chunks")) > 1
    lengths = browser.execute_script("return window.__lengths")
    assert len(set(lengths)) > 2 and lengths == sorted(lengths), "the reply must grow as tokens stream in"
    assert reply.get_attribute("data-finish") == "length"
    assert "finish: length" in browser.find_element(By.ID, "status").text
    assert [m.text for m in browser.find_elements(By.CSS_SELECTOR, ".msg.user")] == [first_user]

    # The second turn is sent with the first one as history.
    second_user = "And another?"
    reply = send_and_wait(browser, second_user)
    assert reply_text(browser, reply) == expected([
        {"role": "user", "content": first_user}, {"role": "assistant", "content": first_answer},
        {"role": "user", "content": second_user}])

    browser.find_element(By.ID, "clear").click()
    assert browser.find_elements(By.CSS_SELECTOR, ".msg") == []
    reply = send_and_wait(browser, second_user)  # a fresh conversation: no history any more
    assert reply_text(browser, reply) == expected([{"role": "user", "content": second_user}])

    # Completion mode continues the text itself.
    browser.find_element(By.ID, "clear").click()
    set_value(browser, "mode", "completion")
    set_value(browser, "temperature", 0)
    prompt = "Every effort moves you"
    reply = send_and_wait(browser, prompt)
    assert reply_text(browser, reply) == prompt + generate_text(served.model, served.tokenizer, prompt, 24,
                                                                temperature=0.0, top_p=1.0, seed=SEED)


def test_chat_page_shows_api_errors(browser, server):
    browser.get(server.url + "/")
    set_value(browser, "api-key", "wrong-key")
    WebDriverWait(browser, 15).until(lambda d: "incorrect API key" in d.find_element(By.ID, "model").text)
    set_value(browser, "mode", "completion")
    browser.find_element(By.ID, "prompt").send_keys("hello")
    browser.find_element(By.ID, "send").click()
    error = WebDriverWait(browser, 15).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error"))
    assert "incorrect API key" in error[0].text
    assert browser.find_element(By.ID, "send").is_enabled()
