"""The web UI ("the BAGEL playground", cluster/webui/ at /ui/) in a real headless Chromium,
driven by Selenium against the running Serve app with the demo model (random weights).

Needs Debian's `chromium` and `chromium-driver` (`apt-get install -y chromium chromium-driver`);
without them the tests fail (they do not skip). Screenshots of every state go to
test-artifacts/webui/.
"""
from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from bagel_model.demo import demo_checkpoint_dir
from cluster.knobs import web_knobs

from .service_app import REPO_ROOT, running_app

try:  # selenium is in the `test` extra; without it the browser fixture fails (no skip)
    from selenium import webdriver
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait
except ImportError as e:  # pragma: no cover - reported as a failure by the browser fixture
    webdriver = None
    SELENIUM_ERROR = str(e)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.*")

ARTIFACTS = REPO_ROOT / "test-artifacts" / "webui"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run"]
WINDOW = (1280, 900)
INSTALL_HINT = "install them with: apt-get install -y chromium chromium-driver"
WAIT_S = 60
STEPS = "4"


# -- the service and the browser ----------------------------------------------------------------

@pytest.fixture(scope="module")
def base_url(ray_url) -> Iterator[str]:
    """The app with the demo model (random weights) on the session's Ray (conftest's `ray_url`)."""
    args = {"checkpoint_dir": str(demo_checkpoint_dir()), "device": "cpu", "dtype": "float32"}
    with running_app(ray_url, args):
        yield ray_url


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if webdriver is None:
        pytest.fail(f"selenium is not installed ({SELENIUM_ERROR}): pip install -e '.[test]'")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.fail(f"headless browser tests need chromium and chromedriver on PATH "
                    f"(found chromium={chromium}, chromedriver={driver_path}); {INSTALL_HINT}")
    options = Options()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    os.environ.setdefault("SE_AVOID_STATS", "true")
    try:
        driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    except Exception as e:
        pytest.fail(f"cannot start headless chromium ({chromium}, {driver_path}): {e}")
    driver.set_page_load_timeout(30)
    driver.set_window_size(*WINDOW)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def page(browser, base_url):
    """The playground freshly loaded from `/` (which redirects to /ui/), health checked."""
    browser.get(base_url + "/")
    wait(browser, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true", "page script")
    wait(browser, lambda d: "connecting" not in d.find_element(By.ID, "model-status").text, "the /health call")
    return browser


def wait(driver, condition, what: str, timeout: float = WAIT_S):
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)
    except TimeoutException:
        shot(driver, f"timeout-{what.replace(' ', '-').replace('/', '')}")
        errors = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".message.error") if e.is_displayed()]
        pytest.fail(f"timed out after {timeout} s waiting for {what}; errors shown: {errors}")


def shot(driver, name: str) -> None:
    """A screenshot of the whole page (the window grown to the page's height for it)."""
    height = driver.execute_script("window.scrollTo(0, 0); return document.documentElement.scrollHeight;")
    driver.set_window_size(WINDOW[0], max(WINDOW[1], height + 100))
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))
    driver.set_window_size(*WINDOW)


def panel(driver, task: str):
    driver.find_element(By.ID, f"tab-{task}").click()
    section = driver.find_element(By.ID, f"panel-{task}")
    assert section.is_displayed()
    return section


def role(section, name: str):
    return section.find_element(By.CSS_SELECTOR, f'[data-role="{name}"]')


def set_value(section, element_id: str, value: str) -> None:
    details = section.find_element(By.CSS_SELECTOR, "details.knobs")
    if details.get_attribute("open") is None:
        details.find_element(By.TAG_NAME, "summary").click()
    field = section.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def wait_for_image(driver, section, what: str) -> str:
    """Waits for the result image; returns its caption ("WxH · seed N · T s")."""
    wait(driver, lambda d: (role(section, "result").is_displayed() and role(section, "result").get_attribute(
        "data-preview") is None) or role(section, "error").is_displayed(), what)  # the image, not a preview
    assert not role(section, "error").is_displayed(), f"{what}: the page shows an error: {role(section, 'error').text}"
    image = role(section, "image")
    assert image.get_attribute("src").startswith("data:image/png;base64,")
    wait(driver, lambda d: d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image) > 0,
         f"{what}: the image to decode", timeout=10)
    return role(section, "meta").text


def wait_idle(base_url: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while (health := httpx.get(base_url + "/health", timeout=10).json())["requests_in_system"]:
        assert time.monotonic() < deadline, f"the server still works on {health['requests_in_system']} requests"
        time.sleep(0.1)


# -- tests --------------------------------------------------------------------------------------

def test_root_redirects_to_the_ui_and_files_are_served(base_url):
    r = httpx.get(base_url + "/", follow_redirects=False)
    assert r.status_code in (302, 307) and r.headers["location"].endswith("/ui/")
    for path, kind in (("/ui/", "text/html"), ("/ui/app.js", "javascript"), ("/ui/style.css", "text/css")):
        r = httpx.get(base_url + path)
        assert r.status_code == 200 and kind in r.headers["content-type"], (path, r.status_code, r.headers)
    assert httpx.get(base_url + "/ui/missing.js").status_code == 404
    assert httpx.get(base_url + "/health").json()["demo"] is True  # the API is unchanged beside the UI


def test_demo_banner(page):
    banner = page.find_element(By.ID, "demo-banner")
    assert banner.is_displayed()
    assert "RANDOM weights" in banner.text and "noise" in banner.text
    assert "bagel-demo" in page.find_element(By.ID, "model-status").text
    assert page.current_url.endswith("/ui/#t2i")
    shot(page, "01-start")


def test_the_page_shows_the_servers_knobs_and_defaults(page, base_url):
    """Every setting, its help and each task's default come from GET /knobs (cluster/knobs.py,
    made from pipelines/params.py; tests/test_knobs.py checks it against the parameters)."""
    served = httpx.get(base_url + "/knobs").json()
    assert served == web_knobs()
    for task, defaults in (("t2i", served["defaults"]["t2i"]), ("think", served["defaults"]["t2i"]),
                           ("edit", served["defaults"]["edit"])):
        section = panel(page, task)
        for knob in served["knobs"]:
            field = section.find_element(By.ID, f"{task}-{knob['name']}")
            shown, default = field.get_attribute("value"), defaults[knob["name"]]
            assert shown == default if isinstance(default, str) else float(shown) == default, (task, knob["name"])
            label = field.find_element(By.XPATH, "..")
            assert label.get_attribute("title") == knob["help"] and knob["label"] in label.get_attribute("textContent")
    panel(page, "chat")
    for name, default in served["chat"].items():
        assert float(page.find_element(By.ID, f"chat-{name}").get_attribute("value")) == default


def test_text_to_image_with_live_progress(page):
    section = panel(page, "t2i")
    # the per-task defaults of the official inferencer
    assert section.find_element(By.ID, "t2i-cfg_img_scale").get_attribute("value") == "1"
    assert section.find_element(By.ID, "t2i-cfg_interval_start").get_attribute("value") == "0.4"
    assert section.find_element(By.ID, "t2i-cfg_renorm_type").get_attribute("value") == "global"
    assert section.find_element(By.ID, "t2i-num_timesteps").get_attribute("value") == "50"
    role(section, "prompt").send_keys("A red fox in the snow.")
    Select(role(section, "size-preset")).select_by_value("64x64")
    assert Select(role(section, "width")).first_selected_option.text == "64"
    set_value(section, "t2i-num_timesteps", STEPS)
    set_value(section, "t2i-seed", "1234")
    shot(page, "02-t2i-settings")
    role(section, "run").click()
    caption = wait_for_image(page, section, "the text-to-image result")
    assert caption.startswith("64×64 · seed 1234"), caption
    shot(page, "03-t2i-result")
    role(section, "to-edit").click()  # the result becomes the Edit tab's input
    edit = page.find_element(By.ID, "panel-edit")
    assert edit.is_displayed() and role(edit, "preview").get_attribute("src") == role(section, "image").get_attribute("src")


def test_previews_show_live(page):
    """Partial images: each preview replaces the last while the image is made, then the image."""
    section = panel(page, "t2i")
    role(section, "prompt").send_keys("A fox, previewed.")
    Select(role(section, "size-preset")).select_by_value("64x64")
    set_value(section, "t2i-num_timesteps", "100")  # 99 steps: previews after steps 25, 50 and 75
    set_value(section, "t2i-seed", "77")
    role(section, "run").click()
    result = role(section, "result")
    wait(page, lambda d: result.get_attribute("data-preview") is not None, "a preview")
    assert role(section, "progress-box").is_displayed()  # still generating
    assert role(section, "image").get_attribute("src").startswith("data:image/png;base64,")
    assert role(section, "meta").text in ("Preview 1 · after step 25 of 99", "Preview 2 · after step 50 of 99")
    shot(page, "03b-t2i-preview")
    wait(page, lambda d: result.get_attribute("data-preview") is None
         and role(section, "meta").text.startswith("64×64 · seed 77"), "the image after its previews")
    assert result.get_attribute("data-previews-shown") == "3"
    assert page.execute_script("return arguments[0].naturalWidth", role(section, "image")) == 64


def test_progress_and_cancel(page, base_url):
    section = panel(page, "t2i")
    role(section, "prompt").send_keys("A long one, cancelled.")
    set_value(section, "t2i-num_timesteps", "200")  # the service's limit: long enough to cancel
    role(section, "run").click()
    wait(page, lambda d: role(section, "progress-text").text.startswith("Step "), "a progress event")
    assert " of 199" in role(section, "progress-text").text
    assert page.execute_script("return arguments[0].value", role(section, "progress")) >= 1
    shot(page, "04-t2i-progress")
    role(section, "cancel").click()
    wait(page, lambda d: role(section, "status").text == "Cancelled.", "the cancelled state")
    assert not role(section, "progress-box").is_displayed()
    assert role(section, "run").is_enabled() and not role(section, "cancel").is_enabled()
    wait_idle(base_url)  # the server stopped the work when the fetch was aborted
    shot(page, "05-t2i-cancelled")


def test_bad_value_shows_the_server_error(page):
    section = panel(page, "t2i")
    role(section, "prompt").send_keys("Too few steps.")
    set_value(section, "t2i-num_timesteps", "1")
    role(section, "run").click()
    wait(page, lambda d: role(section, "error").is_displayed(), "the error message")
    assert role(section, "error").text == "num_timesteps must be an integer in [2, 1000]"
    shot(page, "06-t2i-error")
    # the approximate knob reaches the server too
    set_value(section, "t2i-num_timesteps", STEPS)
    set_value(section, "t2i-cfg_refresh_interval", "0")
    role(section, "run").click()
    wait(page, lambda d: role(section, "error").is_displayed(), "the refresh error")
    assert role(section, "error").text == "cfg_refresh_interval must be an integer in [1, 10]"
    set_value(section, "t2i-cfg_refresh_interval", "1")
    # a size beyond the demo model's largest side: the server's message names the range
    Select(role(section, "size-preset")).select_by_value("1024x1024")
    role(section, "run").click()
    wait(page, lambda d: role(section, "error").is_displayed(), "the size error")
    assert "must be an integer multiple of 16" in role(section, "error").text
    # 429: the page says when to retry (the service's busy answer, made here: the demo model is too fast to fill the queue)
    busy = page.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "errorMessage(new Response(JSON.stringify({error: {message: 'server busy: 40 requests'}}),"
        " {status: 429, headers: {'Retry-After': '2'}})).then(done);")
    assert busy == "Server busy, retry in 2 s. (server busy: 40 requests)"
    # 401 (a service with an API key): the page asks for the key, then sends it as a bearer token
    denied = page.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "errorMessage(new Response(JSON.stringify({error: {message: 'missing or wrong API key'}}), {status: 401}))"
        ".then(done);")
    assert denied == "missing or wrong API key Enter the service's API key at the top of the page."
    key = page.find_element(By.ID, "api-key")
    assert "needed" in key.find_element(By.XPATH, "..").get_attribute("class")
    key.send_keys("sk-test")
    sent = page.execute_async_script(
        "const done = arguments[arguments.length - 1]; const real = window.fetch;"
        "window.fetch = (url, init) => { window.fetch = real; done(init.headers.Authorization);"
        " return Promise.reject(new Error('stop')); };"
        "post('v1/models', {}).catch(() => {});")
    assert sent == "Bearer sk-test"
    page.execute_script("sessionStorage.clear(); document.getElementById('api-key').value = '';")


def test_think_streams_the_thought(page):
    section = panel(page, "think")
    role(section, "prompt").send_keys("A lighthouse at night.")
    Select(role(section, "size-preset")).select_by_value("64x64")
    set_value(section, "think-num_timesteps", STEPS)
    set_value(section, "think-max_think_tokens", "12")
    role(section, "run").click()
    wait_for_image(page, section, "the think result")
    assert role(section, "thought-box").is_displayed()
    assert role(section, "thought").text.strip(), "no thought shown"
    shot(page, "07-think-result")


def test_edit_with_an_uploaded_image(page, tmp_path):
    section = panel(page, "edit")
    assert section.find_element(By.ID, "edit-cfg_img_scale").get_attribute("value") == "2"
    assert section.find_element(By.ID, "edit-cfg_renorm_type").get_attribute("value") == "text_channel"
    assert section.find_element(By.ID, "edit-cfg_interval_start").get_attribute("value") == "0"
    # bad uploads: not an image, and an "image" that does not decode
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    for name, expected in (("notes.txt", "is not an image"), ("broken.png", "not a readable image")):
        section.find_element(By.ID, "edit-file").send_keys(str(tmp_path / name))
        wait(page, lambda d: role(section, "error").is_displayed(), f"the upload error for {name}")
        assert expected in role(section, "error").text, role(section, "error").text
    shot(page, "08-edit-bad-upload")
    role(section, "run").click()  # no image chosen
    assert role(section, "error").text == "Please choose an input image first."

    gradient = Image.new("RGB", (160, 128))
    gradient.putdata([(x * 255 // 159, y * 255 // 127, 128) for y in range(128) for x in range(160)])
    gradient.save(tmp_path / "input.png")
    section.find_element(By.ID, "edit-file").send_keys(str(tmp_path / "input.png"))
    wait(page, lambda d: role(section, "preview").is_displayed(), "the upload preview")
    assert not role(section, "error").is_displayed()
    role(section, "prompt").send_keys("Make it purple.")
    set_value(section, "edit-num_timesteps", STEPS)
    role(section, "run").click()
    caption = wait_for_image(page, section, "the edit result")
    assert "seed " in caption
    shot(page, "09-edit-result")


def test_chat_streams_an_answer(page, tmp_path):
    section = panel(page, "chat")
    Image.new("RGB", (96, 96), (200, 30, 30)).save(tmp_path / "red.png")
    page.find_element(By.ID, "chat-file").send_keys(str(tmp_path / "red.png"))
    wait(page, lambda d: d.find_element(By.ID, "chat-preview").is_displayed(), "the chat image preview")
    set_value(section, "chat-max_tokens", "8")
    page.find_element(By.ID, "chat-prompt").send_keys("What is in this picture?")
    page.find_element(By.ID, "chat-run").click()
    answer = ".bubble.assistant:not(.streaming) .text"
    wait(page, lambda d: d.find_elements(By.CSS_SELECTOR, answer) or d.find_element(By.ID, "chat-error").is_displayed(),
         "the chat answer")
    assert not page.find_element(By.ID, "chat-error").is_displayed(), page.find_element(By.ID, "chat-error").text
    assert page.find_element(By.CSS_SELECTOR, answer).text.strip(), "empty answer"
    assert page.find_elements(By.CSS_SELECTOR, ".bubble.user img.thumb"), "the question's image is not shown"
    shot(page, "10-chat-answer")
    # a follow-up question keeps the conversation (the image was sent with the first one)
    page.find_element(By.ID, "chat-prompt").send_keys("And the colour?")
    page.find_element(By.ID, "chat-run").click()
    wait(page, lambda d: len(d.find_elements(By.CSS_SELECTOR, answer)) == 2 or d.find_element(By.ID, "chat-error").is_displayed(),
         "the follow-up answer")
    assert not page.find_element(By.ID, "chat-error").is_displayed(), page.find_element(By.ID, "chat-error").text
    shot(page, "11-chat-follow-up")
