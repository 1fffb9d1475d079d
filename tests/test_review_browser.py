"""The review page in a real headless browser (Debian's chromium through selenium).

Opens a label folder, changes 5 columns' classes (3 by clicking the image and a class
button, 2 from the lowest-confidence list and a number key), adds a column, deletes one,
saves, reloads: the page and the files hold exactly those 7 changes. Skips when chromium,
its driver or selenium is missing (``apt-get install chromium chromium-driver``).

``SIMGEN_REVIEW_SCREENSHOT=docs/images/review.png`` also saves a screenshot of the page.
"""

from __future__ import annotations

import csv
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _labelfolder import write_label_folder

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path):
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        pytest.skip("needs Debian's chromium and chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1500,950",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture
def server(tmp_path):
    from training.experiments.review_app import create_app, make_server

    root = tmp_path / "labelled"
    write_label_folder(root, n_images=2, shape=(128, 128))
    srv = make_server(create_app(root), "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{srv.socket.getsockname()[1]}/"
    srv.shutdown()
    srv.server_close()


def _wait(driver, script, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {script}")


def _n_edits(driver):
    return driver.execute_script("return window.review.S.state.edits.length")


def _click_image(driver, x, y):
    """Click the canvas at image position (x, y) [px]."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    canvas = driver.find_element(By.ID, "canvas")
    sx, sy = driver.execute_script(f"return window.review.toScreen({x}, {y})")
    w, h = canvas.size["width"], canvas.size["height"]
    ActionChains(driver).move_to_element_with_offset(
        canvas, int(round(sx - w / 2)), int(round(sy - h / 2))
    ).click().perform()


def test_review_in_a_browser_change_add_delete_save_reload(browser, server):
    from selenium.webdriver.common.by import By

    root, url = server
    d = browser
    d.get(url)
    _wait(d, "return !!(window.review && window.review.S.state && window.review.S.bitmap)")
    columns = d.execute_script("return window.review.S.state.columns")
    h, w = 128, 128

    def inner(c):
        return 15 < c["x"] < w - 15 and 15 < c["y"] < h - 15 and c["detected"]

    metals = [c for c in columns if c["site"] == "metal" and c["class_id"] == 1 and inner(c)]
    chals = [c for c in columns if c["site"] == "chalcogen" and c["class_id"] == 2 and inner(c)]
    expected = []
    # 3 changes by clicking the image, then a class button
    for col, new in ((metals[0], "dopant_M"), (chals[0], "sub_X1"), (metals[5], "antisite_X2")):
        n = _n_edits(d)
        _click_image(d, col["x"], col["y"])
        _wait(d, f"return window.review.S.selected === {col['column']}")
        old = d.find_element(By.CSS_SELECTOR, "#class-buttons button.current").get_attribute(
            "data-class"
        )
        d.find_element(By.CSS_SELECTOR, f'#class-buttons button[data-class="{new}"]').click()
        _wait(d, f"return window.review.S.state.edits.length === {n + 1}")
        expected.append(("change", col["column"], old, new))
    # a class not allowed on the site has no button: metal-site classes on a chalcogen column
    _click_image(d, chals[3]["x"], chals[3]["y"])
    _wait(d, f"return window.review.S.selected === {chals[3]['column']}")
    offered = [
        b.get_attribute("data-class")
        for b in d.find_elements(By.CSS_SELECTOR, "#class-buttons button")
    ]
    assert "dopant_M" not in offered and "vac_X2" in offered
    # 2 changes from the lowest-confidence list with a number key (allowed class #2)
    body = d.find_element(By.TAG_NAME, "body")
    for pos in range(2):
        n = _n_edits(d)
        item = d.find_elements(By.CSS_SELECTOR, "#low-list li")[pos]
        column = int(item.get_attribute("data-column"))
        col = next(c for c in columns if c["column"] == column)
        item.click()
        _wait(d, f"return window.review.S.selected === {column}")
        allowed = d.execute_script(f"return window.review.S.state.allowed['{col['site']}']")
        current = d.execute_script(
            "const S = window.review.S; const c = S.state.columns.find("
            f"q => q.column === {column}); return S.state.classes.find(k => k.id === "
            "c.class_id).name"
        )
        new = allowed[1] if allowed[1] != current else allowed[0]
        body.send_keys(str(allowed.index(new) + 1))
        _wait(d, f"return window.review.S.state.edits.length === {n + 1}")
        expected.append(("change", column, current, new))
    # add a missed column (key a, click the image), delete a spurious one (click, key x)
    n = _n_edits(d)
    Select = pytest.importorskip("selenium.webdriver.support.ui").Select
    Select(d.find_element(By.ID, "add-class")).select_by_value("sub_X2")
    body.send_keys("a")
    _click_image(d, 64.0, 3.0)
    _wait(d, f"return window.review.S.state.edits.length === {n + 1}")
    expected.append(("add", len(columns), "", "sub_X2"))
    victim = chals[6]
    _click_image(d, victim["x"], victim["y"])
    _wait(d, f"return window.review.S.selected === {victim['column']}")
    old = d.find_element(By.CSS_SELECTOR, "#class-buttons button.current").get_attribute(
        "data-class"
    )
    body.send_keys("x")
    _wait(d, f"return window.review.S.state.edits.length === {n + 2}")
    expected.append(("delete", victim["column"], old, ""))
    # the counts on the page follow the edits
    defects = int(d.find_element(By.ID, "defect-count").text)
    assert defects == d.execute_script("return window.review.S.state.counts.defects.count")
    # undo and redo the delete with the keyboard: still 7 changes
    body.send_keys("u")
    _wait(d, f"return window.review.S.state.edits.length === {n + 1}")
    _click_image(d, victim["x"], victim["y"])
    _wait(d, f"return window.review.S.selected === {victim['column']}")
    body.send_keys("x")
    _wait(d, f"return window.review.S.state.edits.length === {n + 2}")
    d.find_element(By.ID, "save").click()
    _wait(d, "return document.getElementById('status').textContent.startsWith('saved')")
    shot = os.environ.get("SIMGEN_REVIEW_SCREENSHOT")
    if shot:
        _click_image(d, chals[3]["x"], chals[3]["y"])
        time.sleep(0.3)
        Path(shot).parent.mkdir(parents=True, exist_ok=True)
        d.save_screenshot(shot)
    d.refresh()
    _wait(d, "return !!(window.review && window.review.S.state && window.review.S.bitmap)")
    assert _n_edits(d) == 7
    assert len(d.find_elements(By.CSS_SELECTOR, "#edit-list li")) == 7
    # the files hold exactly those 7 changes
    with open(root / "img0" / "corrections.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    got = [(r["action"], int(r["column"]), r["old_class"], r["new_class"]) for r in rows]
    assert got == expected
    assert not (root / "img1" / "corrections.csv").exists()
    with open(root / "img0" / "columns_corrected.csv", newline="") as fh:
        corrected = {int(r["column"]): r for r in csv.DictReader(fh)}
    assert len(corrected) == len(columns)  # one added, one deleted
    for action, column, _old, new in expected:
        if action == "delete":
            assert column not in corrected
        else:
            assert corrected[column]["class_name"] == new
            assert corrected[column]["review"] == ("added" if action == "add" else "changed")
    added = corrected[len(columns)]
    assert np.hypot(float(added["x_px"]) - 64.0, float(added["y_px"]) - 3.0) < 0.2
