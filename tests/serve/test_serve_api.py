"""`glimr serve` over HTTP: a real server process (tests/serve/conftest.py) on a real UKBench index."""
from __future__ import annotations

import io
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def auth(serve_token) -> dict:
    return {"Authorization": f"Bearer {serve_token}"}


def ukb(shared_data: Path, i: int) -> Path:
    return shared_data / "ukbench" / f"ukbench{i:05d}.jpg"


def search(url: str, image: Path | bytes, name: str = "q.jpg", timeout: float = 60, **form) -> httpx.Response:
    data = image.read_bytes() if isinstance(image, Path) else image
    return httpx.post(url + "/api/search", files={"image": (name, data, "image/jpeg")},
                      data={k: str(v) for k, v in form.items()}, timeout=timeout)


def cli_search(index: Path, query: Path, *args: str) -> list[tuple[str, float]]:
    import contextlib

    from glimr.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["search", str(index), str(query), "--json", *args]) == 0
    return [(r["path"], r["score"]) for r in json.loads(out.getvalue())["results"]]


def test_top4_are_the_objects_views(server, shared_data):
    for obj in (0, 40):
        r = search(server.url, ukb(shared_data, 4 * obj + 1), top=10)
        assert r.status_code == 200, r.text
        body = r.json()
        top4 = {h["path"] for h in body["results"][:4]}
        assert top4 == {f"ukbench{4 * obj + k:05d}.jpg" for k in range(4)}
        assert body["model"] == "gem-lite2-realw768" and len(body["results"]) == 10
        assert [h["rank"] for h in body["results"]] == list(range(1, 11))
        scores = [h["score"] for h in body["results"]]
        assert scores == sorted(scores, reverse=True) and body["timing_ms"] > 0


@pytest.mark.parametrize("rerank, extra", [("none", {}), ("none", {"crop": "100,60,540,420"}), ("aqe", {}),
                                           ("diffusion", {}), ("sv", {"shortlist": 24})])
def test_same_ranking_as_glimr_search(server, ukb_index, shared_data, rerank, extra):
    q = ukb(shared_data, 9)
    r = search(server.url, q, top=12, rerank=rerank, **extra)
    assert r.status_code == 200, r.text
    api = [(h["path"], h["score"]) for h in r.json()["results"]]
    cli = cli_search(ukb_index, q, "--top", "12", "--rerank", rerank,
                     *[a for k, v in extra.items() for a in (f"--{k}", str(v))])
    assert [p for p, _ in api] == [p for p, _ in cli]
    # same code, same float32 arithmetic; the CLI prints 6 decimals: equal within 1e-6 (+ rounding)
    np.testing.assert_allclose([s for _, s in api], [s for _, s in cli], rtol=0, atol=2e-6)


def test_ids_name_images_the_page_can_show(server, shared_data):
    hit = search(server.url, ukb(shared_data, 0), top=3).json()["results"][1]
    r = httpx.get(f"{server.url}/api/images/{hit['id']}", params={"size": 128}, timeout=30)
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(r.content))
    assert max(img.size) == 128 and img.size == (128, 96)   # 640x480 downscaled, aspect kept
    assert r.headers["x-content-type-options"] == "nosniff"


def test_explain_heat_maps(server, shared_data):
    body = search(server.url, ukb(shared_data, 0), top=4).json()
    hit = body["results"][1]
    r = httpx.get(f"{server.url}/api/images/{hit['id']}/explain", params={"query": body["query"]}, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    pair = Image.open(io.BytesIO(r.content))
    assert pair.format == "PNG" and pair.width > 600   # query, candidate, co-attention, L2-norm panels
    r = httpx.get(f"{server.url}/api/images/{hit['id']}/explain", timeout=120)
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).format == "PNG"
    r = httpx.get(f"{server.url}/api/images/{hit['id']}/explain", params={"query": "0" * 32}, timeout=30)
    assert r.status_code == 404 and "search again" in r.json()["detail"]


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 120, 150)).save(buf, format="PNG")
    return buf.getvalue()


def test_error_cases(server, ro_server, shared_data, auth, serve_limits):
    url = server.url
    upload_mb, max_pixels = serve_limits["upload_mb"], serve_limits["max_pixels"]
    q = ukb(shared_data, 0)
    # upload cap: 413 before the body is read
    big = b"\xff\xd8\xff" + bytes((upload_mb << 20) + 1000)
    r = search(url, big)
    assert r.status_code == 413 and "larger than this service accepts" in r.json()["detail"]
    # pixel cap: a small file of too many pixels
    r = search(url, _png(2000, 1001), name="wide.png")
    assert r.status_code == 413 and f"exceeds max_pixels = {max_pixels:,}" in r.json()["detail"]
    # not an image: 415 with the reason and the uploaded name
    r = search(url, b"just some text, not a photo\n", name="notes.txt")
    assert r.status_code == 415 and "'notes.txt': not a supported image" in r.json()["detail"]
    # a truncated JPEG and an empty file: 422 with the reason
    r = search(url, q.read_bytes()[:2000], name="cut.jpg")
    assert r.status_code == 422 and "corrupt or truncated" in r.json()["detail"]
    r = search(url, b"", name="empty.jpg")
    assert r.status_code == 422 and "empty" in r.json()["detail"]
    # bad crop, top and rerank: 422
    for form, words in (({"crop": "1,2,3"}, "crop: bad box"), ({"crop": "50,50,10,10"}, "x1 > x0"),
                        ({"crop": "nan,0,5,5"}, "finite"), ({"crop": "700,500,900,600"}, "lies outside the 640x480"),
                        ({"top": 0}, "greater than or equal to 1"), ({"top": 101}, "less than or equal to 100"),
                        ({"top": "ten"}, "valid integer"), ({"rerank": "magic"}, "rerank"),
                        ({"rerank": "coattention"}, "--coattention")):
        r = search(url, q, **form)
        assert r.status_code == 422, (form, r.text)
        assert words in json.dumps(r.json()["detail"]), (form, r.text)
    # unknown ids, path traversal: 404 / 422, never a file outside the index
    assert httpx.get(f"{url}/api/images/99999", timeout=10).status_code == 404
    assert httpx.get(f"{url}/api/images/-1", timeout=10).status_code == 422
    for path in ("/api/images/..%2F..%2Fetc%2Fpasswd", "/static/..%2F..%2Fapi.py", "/static/../api.py",
                 "/static/%2e%2e/api.py"):
        r = httpx.get(url + path, timeout=10)
        assert r.status_code in (404, 422) and b"import" not in r.content, path
    # writes: 401 without or with a wrong token, 403 on a read-only service; nothing changes
    files = {"image": ("q.jpg", q.read_bytes(), "image/jpeg")}
    r = httpx.post(f"{url}/api/images", files=files, timeout=10)
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    r = httpx.post(f"{url}/api/images", files=files, headers={"Authorization": "Bearer nope-nope"}, timeout=10)
    assert r.status_code == 401 and "wrong token" in r.json()["detail"]
    assert httpx.delete(f"{url}/api/images/5", timeout=10).status_code == 401
    r = httpx.post(f"{ro_server.url}/api/images", files=files, headers=auth, timeout=10)
    assert r.status_code == 403 and "read-only" in r.json()["detail"]
    assert httpx.delete(f"{ro_server.url}/api/images/5", headers=auth, timeout=10).status_code == 403
    assert httpx.get(f"{url}/api/stats", timeout=10).json()["images"] == 300
    assert server.alive()


def test_survives_a_client_that_leaves_mid_upload(server, shared_data):
    def metric(name: str) -> float:
        text = httpx.get(server.url + "/metrics", timeout=10).text
        return float(next(ln.split()[-1] for ln in text.splitlines() if ln.startswith(name + " ")))

    before = metric("glimr_client_disconnects_total")
    body = ukb(shared_data, 0).read_bytes()
    head = (f"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=XyZ\r\n"
            f"Content-Length: {len(body) + 400}\r\n\r\n--XyZ\r\nContent-Disposition: form-data; name=\"image\"; "
            f"filename=\"q.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").encode()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(head + body[: len(body) // 3])
        time.sleep(0.2)
    deadline = time.monotonic() + 20
    while metric("glimr_client_disconnects_total") < before + 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metric("glimr_client_disconnects_total") >= before + 3
    assert server.alive()
    r = search(server.url, ukb(shared_data, 0), top=4)
    assert r.status_code == 200 and r.json()["results"][0]["path"] == "ukbench00000.jpg"


def test_add_search_delete(server, ukb_index, shared_data, auth):
    photo = sorted((shared_data / "photos").glob("*.JPEG"))[3]
    r = httpx.post(f"{server.url}/api/images", files={"image": (photo.name, photo.read_bytes(), "image/jpeg")},
                   headers=auth, timeout=120)
    assert r.status_code == 201, r.text
    added = r.json()
    stored = Path(added["path"])
    assert added["added"] and stored.is_file() and stored.parent == (ukb_index / "uploads").resolve()
    assert stored.read_bytes() == photo.read_bytes()
    # the same content again is not added twice
    r = httpx.post(f"{server.url}/api/images", files={"image": ("again.jpg", photo.read_bytes(), "image/jpeg")},
                   headers=auth, timeout=120)
    assert r.status_code == 200 and r.json() == {**added, "added": False}
    hits = search(server.url, photo, top=3).json()["results"]
    assert hits[0]["id"] == added["id"] and hits[0]["score"] > 0.99   # itself, re-embedded identically
    assert httpx.get(f"{server.url}/api/images/{added['id']}", timeout=30).status_code == 200
    # committed durably into the folder: another process sees it (the CLI, reading the index)
    from glimr.index.store import IndexStore

    with IndexStore.open(ukb_index) as store:
        assert store.stats()["images"] == 301 and store.rows()[added["path"]].status == "ok"
    r = httpx.delete(f"{server.url}/api/images/{added['id']}", headers=auth, timeout=120)
    assert r.status_code == 200 and r.json()["deleted"]
    assert not stored.exists()
    assert httpx.delete(f"{server.url}/api/images/{added['id']}", headers=auth, timeout=30).status_code == 404
    assert added["id"] not in [h["id"] for h in search(server.url, photo, top=5).json()["results"]]
    with IndexStore.open(ukb_index) as store:
        assert store.stats()["images"] == 300 and added["path"] not in store.rows()


def test_searches_see_before_or_after_a_commit(server, shared_data, auth):
    """Searches run while an image is added and deleted again: each answer is the ranking before the add or
    the one after it (the new image first), never a mix, never an error."""
    photo = sorted((shared_data / "photos").glob("*.JPEG"))[7]
    data = photo.read_bytes()
    before = [h["id"] for h in search(server.url, data, top=5).json()["results"]]
    answers: list = []
    stop = threading.Event()

    def client():
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                r = c.post(server.url + "/api/search", files={"image": ("p.jpg", data, "image/jpeg")},
                           data={"top": "5"})
                answers.append((r.status_code, [h["id"] for h in r.json()["results"]] if r.status_code == 200
                                else r.text))

    threads = [threading.Thread(target=client) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        r = httpx.post(f"{server.url}/api/images", files={"image": ("p.jpg", data, "image/jpeg")}, headers=auth,
                       timeout=120)
        assert r.status_code == 201, r.text
        new = r.json()["id"]
        time.sleep(1.0)
        assert httpx.delete(f"{server.url}/api/images/{new}", headers=auth, timeout=120).status_code == 200
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=120)
    after = [new] + before[:4]
    assert all(code == 200 for code, _ in answers), answers
    assert len(answers) >= 6
    assert all(ids in (before, after) for _, ids in answers), answers
    assert any(ids == after for _, ids in answers)   # the add was seen while it was there


def test_stats_health_metrics(server):
    s = httpx.get(server.url + "/api/stats", timeout=10).json()
    assert s["images"] == 300 and s["model"] == "gem-lite2-realw768" and s["max_size"] == 256
    assert s["reranks"] == ["none", "aqe", "qe", "diffusion", "sv", "sv-deep"] and s["read_only"] is False
    assert httpx.get(server.url + "/healthz", timeout=10).json() == {"status": "ok", "images": 300}
    text = httpx.get(server.url + "/metrics", timeout=10)
    assert text.headers["content-type"].startswith("text/plain; version=0.0.4")
    lines = text.text.splitlines()
    assert "# TYPE glimr_http_requests_total counter" in lines
    assert "# TYPE glimr_http_request_duration_seconds histogram" in lines
    assert "glimr_index_images 300" in lines
    ok = [ln for ln in lines if ln.startswith('glimr_http_requests_total{method="GET",route="/healthz",status="200"}')]
    assert len(ok) == 1 and int(ok[0].split()[-1]) >= 1
    inf = [ln for ln in lines if ln.startswith('glimr_http_request_duration_seconds_bucket{route="/healthz",le="+Inf"}')]
    count = [ln for ln in lines if ln.startswith('glimr_http_request_duration_seconds_count{route="/healthz"}')]
    assert inf[0].split()[-1] == count[0].split()[-1]


def test_page_and_docs_are_local(server):
    from glimr.serve.api import STATIC

    r = httpx.get(server.url + "/", timeout=10)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    assert "default-src 'self'" in r.headers["content-security-policy"]
    for f in STATIC.iterdir():
        text = f.read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text, f.name
    assert httpx.get(server.url + "/docs", timeout=10).status_code == 200
    spec = httpx.get(server.url + "/openapi.json", timeout=10).json()
    assert {"/api/search", "/api/images", "/api/images/{image_id}", "/api/images/{image_id}/explain", "/api/stats",
            "/healthz", "/metrics"} <= set(spec["paths"])


def test_cli_defaults_and_token_file_errors(tmp_path, ukb_index, capsys):
    from glimr.cli import build_parser, main

    args = build_parser().parse_args(["serve", str(ukb_index)])
    assert (args.host, args.port, args.token_file) == ("127.0.0.1", 8000, None)
    assert main(["serve", str(ukb_index), "--token-file", str(tmp_path / "missing")]) == 2
    assert f"'{tmp_path / 'missing'}' does not exist" in capsys.readouterr().err
    (tmp_path / "short").write_text("abc\n")
    assert main(["serve", str(ukb_index), "--token-file", str(tmp_path / "short")]) == 2
    assert "at least 8 characters" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--port", "1"]) == 2
    assert "is not a glimr index" in capsys.readouterr().err
