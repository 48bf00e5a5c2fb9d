"""The Gradio demo, driven in a real headless Chromium: its outputs must match the API's."""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytest.importorskip("gradio", reason="the demo extra is not installed (pip install -e '.[demo]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url():
    port = _free_port()
    env = os.environ | {"HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "scripts" / "app.py"), "--port", str(port), "--threads", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None:
                pytest.fail(f"the app exited: {proc.stdout.read().decode()[-2000:]}")
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the app did not start in 180 s")
    yield url
    proc.kill()
    proc.wait()


def _stats_rows(page) -> list[list[str]]:
    rows = page.locator("#stats table tbody tr")
    return [[c.strip() for c in rows.nth(i).locator("td").all_inner_texts()] for i in range(rows.count())]


def test_page_runs_three_modes_and_matches_the_api(app_url, tmp_path):
    prompt = "Compute 72-35+18."
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(app_url, wait_until="networkidle")
        page.get_by_label("Prompt").fill(prompt)
        page.get_by_role("button", name="Run").click()
        page.wait_for_function("document.querySelectorAll('#stats table tbody tr').length === 3", timeout=180_000)
        outputs = {
            label: page.get_by_label(f"{label} output").input_value()
            for label in ("none", "freecache", "freecache + guide")
        }
        rows = _stats_rows(page)
        shot = tmp_path / "app.png"
        page.screenshot(path=str(shot), full_page=True)
        # the live canvas of the last panel shows its final step, tokens coloured, no mask left
        canvas = page.locator(".canvas").nth(2).inner_html()
        browser.close()
    assert shot.stat().st_size > 10_000
    assert 'class="m"' not in canvas and 'class="t"' in canvas

    from dlmcache import DLMPipeline

    pipe = DLMPipeline.from_pretrained("dlmcache/tiny")
    chat = [[{"role": "user", "content": prompt}]]
    for (label, config, tps, forwards, per_forward, speedup), config_text in zip(
        rows, ("none", "freecache", "freecache+guide=dlmcache/tiny-guide"), strict=True
    ):
        assert config == config_text
        pipe.set_cache(config_text.split("+")[0])
        if "guide" in config_text:
            pipe.set_guide("dlmcache/tiny-guide")
        out = pipe(chat, max_new_tokens=64, block_length=32, steps=64)
        assert outputs[label] == out.texts[0]
        assert int(forwards) == out.nfe
        assert float(per_forward) == pytest.approx(out.stats["answer_tokens"] / out.nfe, abs=0.01)
        assert float(tps) > 0 and re.fullmatch(r"\d+\.\d\dx", speedup)
    assert rows[0][5] == "1.00x"


def test_bad_input_is_reported_in_the_page(app_url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(app_url, wait_until="networkidle")
        page.get_by_label("Prompt").fill("Compute 45+38-27.")
        page.get_by_label("steps (0 = max_new_tokens)").fill("7")
        page.get_by_role("button", name="Run").click()
        page.get_by_text("steps=7 is not divisible by the number of blocks (2)").first.wait_for(timeout=60_000)
        assert "Traceback" not in page.content()
        browser.close()


def test_vlm_tab_draws_kept_tokens_and_matches_the_session(app_url, tmp_path):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(app_url, wait_until="networkidle")
        page.get_by_role("tab", name="GUI agent KV").click()
        page.get_by_role("button", name="Compress").click()
        page.wait_for_function("document.querySelectorAll('#vlm-stats table tbody tr').length === 4", timeout=180_000)
        rows = [
            [c.strip() for c in row.locator("td").all_inner_texts()]
            for row in page.locator("#vlm-stats table tbody tr").all()
        ]
        assert page.locator("img").count() >= 4  # one kept-token map per screenshot
        page.screenshot(path=str(tmp_path / "vlm.png"), full_page=True)
        browser.close()

    import torch
    from app import VLMDemo  # the same model, screenshots and settings as the page's defaults

    demo = VLMDemo(None, "cpu", torch.float32)
    _, table = demo.run(None, 4, "GUI-KV", 0.2, 8)
    want = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[4:]]
    assert rows == want
    assert all(float(r[5].rstrip("x")) <= 0.25 for r in rows)


def test_vlm_tab_takes_uploaded_screenshots_and_refuses_bad_ones(tmp_path):
    import gradio as gr
    import torch
    from app import MAX_SCREENSHOTS, VLMDemo
    from dlmcache.vlm.synthetic import screenshot

    paths = []
    for t in range(3):
        paths.append(str(tmp_path / f"shot{t}.png"))
        screenshot(t, (300, 200)).save(paths[-1])
    demo = VLMDemo(None, "cpu", torch.float32)
    maps, table = demo.run(paths, 4, "StreamingLLM", 0.5, 2)
    assert len(maps) == 2 and maps[0][0].size == (300, 200)  # the last 2 screenshots, at their own size
    rows = [line for line in table.splitlines() if line[:3] in ("| 1", "| 2", "| 3", "| 4")]
    assert len(rows) == 3  # one turn per uploaded screenshot
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(gr.Error, match="not an image"):
        demo.run([str(tmp_path / "bad.png")], 4, "GUI-KV", 0.2, 8)
    with pytest.raises(gr.Error, match="limit"):
        demo.run(paths * 3, 4, "GUI-KV", 0.2, 8)
    assert len(paths * 3) > MAX_SCREENSHOTS
