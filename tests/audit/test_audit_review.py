"""review.html in a real headless browser (Debian's chromium driven by Playwright), from file://: the flagged
classes render with their images and inlier lines, a click confirms a class, the exported decisions.json (a real
download) drives `glimr audit apply` to the expected CSV; decisions survive a reload and load back from the file."""
from __future__ import annotations

import contextlib
import csv
import io
import json

import pytest

from glimr.cli import main

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_review_page_confirm_export_and_apply(browser, planted, planted_audit, tmp_path):
    audit_dir, _ = planted_audit
    classes = json.loads((audit_dir / "flagged.json").read_text())["classes"]
    assert len(classes) >= 3
    page_file = audit_dir / "review.html"
    assert "http://" not in page_file.read_text().replace('xmlns="http://www.w3.org/2000/svg"', "")  # no network
    ctx = browser.new_context(accept_downloads=True)
    page = ctx.new_page()
    requests = []
    page.on("request", lambda r: requests.append(r.url))
    page.set_default_timeout(15_000)
    page.goto(page_file.as_uri())
    sections = page.locator("section.class")
    assert sections.count() == len(classes)
    assert [sections.nth(i).get_attribute("data-landmark") for i in range(len(classes))] == \
        [c["landmark_id"] for c in classes]
    first = sections.nth(0)
    # the eval image beside its training image, with the inlier matches drawn (at least min_inliers of them)
    assert first.locator("svg.pair image").count() == 2 * len(classes[0]["best_pairs"])
    assert first.locator("svg.pair").first.locator("line").count() >= 20
    widths = page.evaluate("Array.from(document.images).length + document.querySelectorAll('svg image').length")
    assert widths >= 2
    assert page.locator("#progress").inner_text() == f"0 of {len(classes)} decided"
    lm0, lm1 = classes[0]["landmark_id"], classes[1]["landmark_id"]
    first.locator("button.confirm").click()
    sections.nth(1).locator("button.reject").click()
    assert "confirmed" in first.get_attribute("class")
    assert page.locator("#progress").inner_text() == f"2 of {len(classes)} decided"
    with page.expect_download() as dl:
        page.click("#export")
    assert dl.value.suggested_filename == "decisions.json"
    decisions = tmp_path / "decisions.json"
    dl.value.save_as(decisions)
    d = json.loads(decisions.read_text())
    assert d["decisions"] == {lm0: "confirm", lm1: "reject"}
    # resumable: a reload keeps the decisions (localStorage) ...
    page.reload()
    assert "confirmed" in page.locator("section.class").nth(0).get_attribute("class")
    assert all(u.startswith(("file://", "data:", "blob:")) for u in requests), requests
    ctx.close()
    # ... and a fresh browser profile loads them from the exported file
    ctx2 = browser.new_context()
    p2 = ctx2.new_page()
    p2.goto(page_file.as_uri())
    assert p2.locator("#progress").inner_text() == f"0 of {len(classes)} decided"
    p2.set_input_files("#load", str(decisions))
    p2.wait_for_function("document.getElementById('progress').textContent.startsWith('2 of')")
    assert "rejected" in p2.locator("section.class").nth(1).get_attribute("class")
    ctx2.close()

    out_csv = tmp_path / "train_clean.csv"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["audit", "apply", str(audit_dir), "--decisions", str(decisions), "--out", str(out_csv)])
    assert rc == 0
    before, after = _rows(planted["train_csv"]), _rows(out_csv)
    assert after[0] == before[0] == ["id", "url", "landmark_id"]
    expected = [r for r in before[1:] if r[2] != lm0]     # every image of the confirmed class, and only those
    assert after[1:] == expected and len(before) - len(after) == 2
    report = buf.getvalue()
    assert "| EVAL | #EVAL IMG | #DUPL EVAL | #DUPL TRAIN GID | #DUPL TRAIN IMG |" in report
    n_eval = len(planted["eval_truth"])
    dupl = len({r["eval_image"] for r in json.loads((audit_dir / "candidates.json").read_text())
                if r["landmark_id"] == lm0 and r["inliers"] >= 20})
    assert f"| eval | {n_eval} | {dupl} ({100 * dupl / n_eval:.0f}%) | 1 | 2 |" in report
    assert f"| TOTAL | {n_eval} | {dupl} | 1 | 2 |" in report
    assert (audit_dir / "report.md").read_text().strip() in report
    undecided = [c["landmark_id"] for c in classes[2:]]
    assert f"undecided: {len(undecided)} flagged classes" in report


def test_apply_refuses_bad_decisions(planted_audit, tmp_path):
    audit_dir, _ = planted_audit
    audit_id = json.loads((audit_dir / "audit.json").read_text())["audit_id"]
    lm = json.loads((audit_dir / "flagged.json").read_text())["classes"][0]["landmark_id"]
    cases = {
        "other.json": ({"audit": "0123456789ab", "decisions": {lm: "confirm"}}, "another audit|holds decisions of audit"),
        "value.json": ({"audit": audit_id, "decisions": {lm: "yes"}}, 'use "confirm" or "reject"'),
        "unknown.json": ({"audit": audit_id, "decisions": {"31337": "confirm"}}, "does not list"),
        "shape.json": ([1, 2], "expected"),
    }
    for name, (content, msg) in cases.items():
        f = tmp_path / name
        f.write_text(json.dumps(content))
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["audit", "apply", str(audit_dir), "--decisions", str(f), "--out", str(tmp_path / "o.csv")])
        assert rc == 2, name
        line = err.getvalue().strip()
        assert "\n" not in line and name in line and any(m in line for m in msg.split("|")), line
    assert not (tmp_path / "o.csv").exists()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        main(["audit", "apply", str(audit_dir), "--out", str(tmp_path / "o.csv")])
    assert e.value.code == 2 and "--decisions" in err.getvalue()
