"""The web page in a real browser (Debian's chromium driven by Playwright): load it, upload a query, draw a crop
with the mouse, check the result grid, open a result's heat map; screenshots go to benchmarks/results/."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (`.ci/run` does)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            yield b
        finally:
            b.close()


def test_search_crop_results_and_heat_map(browser, server, shared_data, tmp_path):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.set_default_timeout(60_000)
    page.goto(server.url + "/")
    page.wait_for_function("() => document.getElementById('stats').textContent.includes('300 images')")
    assert page.locator("#rerank option").all_inner_texts() == ["none", "aqe", "qe", "diffusion", "sv", "sv-deep"]

    page.set_input_files("#file", str(shared_data / "ukbench" / "ukbench00001.jpg"))
    canvas = page.locator("#canvas")
    canvas.wait_for(state="visible")
    box = canvas.bounding_box()
    # drag from 10% to 90% of the photo: the crop is in the photo's own pixels (640x480)
    page.mouse.move(box["x"] + 0.1 * box["width"], box["y"] + 0.1 * box["height"])
    page.mouse.down()
    page.mouse.move(box["x"] + 0.5 * box["width"], box["y"] + 0.5 * box["height"], steps=5)
    page.mouse.move(box["x"] + 0.9 * box["width"], box["y"] + 0.9 * box["height"], steps=5)
    page.mouse.up()
    crop = page.locator("#crop-text").inner_text()
    assert crop.startswith("crop ")
    x0, y0, x1, y1 = (float(v) for v in crop.removeprefix("crop ").split(","))
    # within 2 photo pixels of the drag (screen pixels are rounded)
    assert abs(x0 - 64) <= 2 and abs(y0 - 48) <= 2 and abs(x1 - 576) <= 2 and abs(y1 - 432) <= 2

    page.fill("#top", "8")
    page.click("#search")
    page.wait_for_function("() => document.querySelectorAll('#results .result').length === 8")
    summary = page.locator("#summary").inner_text()
    echoed = [float(v) for v in summary.split("crop ")[1].rstrip(")").split(",")]
    # the service used the drawn box (sent to 0.1 px, shown rounded): within 1 pixel
    assert max(abs(a - b) for a, b in zip(echoed, (x0, y0, x1, y1))) <= 1, summary
    paths = page.locator("#results .result .path").all_inner_texts()
    assert set(paths[:4]) == {f"ukbench{i:05d}.jpg" for i in range(4)}   # the object's four views first
    page.wait_for_function(
        "() => [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(out / "serve_page.png"), full_page=True)

    page.locator("#results .result").nth(1).click()
    page.wait_for_function("() => { const i = document.getElementById('heatmap');"
                           " return !i.hidden && i.complete && i.naturalWidth > 600; }")
    assert "co-attention" in page.locator("#viewer-status").inner_text()
    page.screenshot(path=str(out / "serve_heatmap.png"))
    page.keyboard.press("Escape")
    assert page.locator("#viewer").is_hidden()

    # a message for a file the browser cannot show as an image
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not really a jpeg")
    page.set_input_files("#file", str(bad))
    page.wait_for_function("() => !document.getElementById('message').hidden")
    assert "not an image" in page.locator("#message").inner_text()
    # a message for an error the API answers: a re-ranking this index cannot do (422 with the server's reason)
    page.set_input_files("#file", str(shared_data / "ukbench" / "ukbench00001.jpg"))
    page.wait_for_function("() => !document.getElementById('search').disabled")
    page.evaluate("(() => { const o = document.createElement('option'); o.value = o.textContent = 'coattention';"
                  " document.getElementById('rerank').appendChild(o); })()")
    page.select_option("#rerank", "coattention")
    page.click("#search")
    page.wait_for_function("() => document.getElementById('message').textContent.includes('HTTP 422')")
    assert "--coattention" in page.locator("#message").inner_text()

    assert not errors, errors
    local = (server.url + "/", "blob:", "data:")
    assert requests and all(u.startswith(local) for u in requests), [u for u in requests if not u.startswith(local)]
    page.close()
