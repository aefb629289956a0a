"""`anomaly-core serve`: through real HTTP (httpx against the ASGI app, and once uvicorn on a loopback socket)."""
from __future__ import annotations

import io
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from test_export import write_tiny_knn_bundle  # noqa: E402  (test_export's tiny kNN bundle)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """(bundle dir, {category: [image paths]}, {category: predict's scores}) of a tiny kNN bundle."""
    from anomaly_core.deploy.predict import predict_files

    root = tmp_path_factory.mktemp("serve")
    rows, scores = write_tiny_knn_bundle(root)
    by_id = {r.id: r for r in rows}
    images = {c: [by_id[i].image for i in ids] for c, (ids, _, _) in scores["test"].items()}
    predicted = {c: [r["score"] for r in predict_files(root / "bundle", p, root / f"pred_{c}", category=c,
                                                       batch_size=len(p), progress=False)] for c, p in images.items()}
    single = {c: [r["score"] for r in predict_files(root / "bundle", p, root / f"pred1_{c}", category=c,
                                                    batch_size=1, progress=False)] for c, p in images.items()}
    return root / "bundle", images, {"batch": predicted, "single": single}


def _client(bundle_dir, **cfg):
    from anomaly_core.deploy.serve import ServeConfig, create_app

    return TestClient(create_app(bundle_dir, ServeConfig(**cfg)))


def test_scores_equal_predict_multipart_raw_and_heatmap(bundle):
    from PIL import Image

    bdir, images, pred = bundle
    predicted = pred["batch"]
    with _client(bdir) as c:
        for cat, paths in images.items():
            files = [("file", (Path(p).name, Path(p).read_bytes(), "image/png")) for p in paths]
            r = c.post("/predict", params={"category": cat}, files=files)
            assert r.status_code == 200, r.text
            got = r.json()["results"]
            assert [g["name"] for g in got] == [Path(p).name for p in paths]
            np.testing.assert_allclose([g["score"] for g in got], predicted[cat], rtol=0, atol=1e-6)
            t = got[0]["threshold"]
            assert [g["is_anomalous"] for g in got] == [s >= t for s in predicted[cat]]
            assert got[0]["threshold_source"].startswith("val")
            raw = c.post("/predict", params={"category": cat, "heatmap": "true"}, content=Path(paths[-1]).read_bytes(),
                         headers={"content-type": "image/png"})
            assert raw.status_code == 200, raw.text
            res = raw.json()["results"][0]
            assert abs(res["score"] - pred["single"][cat][-1]) <= 1e-6  # one image: predict --batch-size 1
            import base64

            png = Image.open(io.BytesIO(base64.b64decode(res["heatmap_png"])))
            assert png.format == "PNG" and png.size[0] > 0
        assert c.get("/health").json()["status"] == "ok"
        card = c.get("/model").json()
        assert card["method"] == "knn" and sorted(card["categories"]) == sorted(images)
        assert "<form" in c.get("/").text


def _png(w, h):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (w, h), (10, 20, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_bad_inputs_get_a_4xx_naming_the_problem_and_the_server_stays_healthy(bundle):
    from PIL import Image

    bdir, images, _ = bundle
    cat = next(iter(images))
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    good = Path(images[cat][0]).read_bytes()
    cases = [  # (request kwargs, status, words in the error line)
        (dict(content=b"", headers={"content-type": "image/png"}), 400, "empty"),
        (dict(content=b"\x89PNG\r\n\x1a\n garbage", headers={"content-type": "image/png"}), 400, "not a readable"),
        (dict(content=good[: len(good) // 2], headers={"content-type": "image/png"}), 400, "cannot decode"),
        (dict(content=gif.getvalue(), headers={"content-type": "image/gif"}), 415, "GIF"),
        (dict(content=b'{"a": 1}', headers={"content-type": "application/json"}), 415, "content type"),
        (dict(content=_png(300, 300), headers={"content-type": "image/png"}), 413, "--max-pixels"),
        (dict(content=b"x" * 6000, headers={"content-type": "image/png"}), 413, "--max-bytes"),
        (dict(files=[("f", ("a.png", good, "image/png"))] * 4), 413, "--max-images"),
        (dict(content=b"--x\r\nnot multipart", headers={"content-type": "multipart/form-data; boundary=x"}), 400,
         "multipart"),
    ]
    with _client(bdir, max_pixels=250 * 250, max_bytes=5000 if len(good) < 5000 else len(good) + 10,
                 max_images=3) as c:
        for kwargs, status, words in cases:
            if "--max-bytes" in words and len(good) >= 5000:
                kwargs = dict(content=b"x" * (len(good) + 11), headers={"content-type": "image/png"})
            r = c.post("/predict", params={"category": cat}, **kwargs)
            assert r.status_code == status, (words, r.text)
            err = r.json()["error"]
            assert words in err and "\n" not in err and r.headers["x-request-id"] == r.json()["request_id"]
        r = c.post("/predict", params={"category": "nope"}, content=good, headers={"content-type": "image/png"})
        assert r.status_code == 422 and "nope" in r.json()["error"] and cat in r.json()["error"]
        if len(images) > 1:  # several categories: one must be named
            r = c.post("/predict", content=good, headers={"content-type": "image/png"})
            assert r.status_code == 422 and "category" in r.json()["error"]
        r = c.post("/predict", params={"category": cat, "heatmap": "maybe"}, content=good)
        assert r.status_code == 422 and "heatmap" in r.json()["error"]
        assert c.get("/health").status_code == 200
        assert c.post("/predict", params={"category": cat}, content=good).status_code == 200
        r = c.post("/predict", params={"category": cat}, content=b"", headers={"x-request-id": "proxy-42"})
        assert r.json()["request_id"] == "proxy-42" == r.headers["x-request-id"]  # a reverse proxy's id is kept


def test_internal_failure_is_a_500_with_the_request_id_in_the_log(bundle, caplog):
    bdir, images, _ = bundle
    cat = next(iter(images))
    with _client(bdir) as c:
        engine = c.app.state.scorer.model.engine

        def broken(*a, **k):
            raise RuntimeError("boom")

        c.app.state.scorer.model.engine = broken
        broken.image_size, broken.transductive = engine.image_size, False
        with caplog.at_level("ERROR", logger="anomaly_core.serve"):
            r = c.post("/predict", params={"category": cat}, content=Path(images[cat][0]).read_bytes())
        assert r.status_code == 500
        rid = r.json()["request_id"]
        assert rid in r.json()["error"] and any(rid in rec.getMessage() for rec in caplog.records)
        c.app.state.scorer.model.engine = engine
        assert c.post("/predict", params={"category": cat}, content=Path(images[cat][0]).read_bytes()).status_code == 200


def test_bearer_token_refuses_missing_and_wrong_tokens(bundle):
    bdir, images, _ = bundle
    cat = next(iter(images))
    data = Path(images[cat][0]).read_bytes()
    with _client(bdir, token="s3cret") as c:
        assert c.get("/health").status_code == 200  # for load balancers: no secret in it
        assert c.post("/predict", params={"category": cat}, content=data).status_code == 401
        r = c.post("/predict", params={"category": cat}, content=data, headers={"authorization": "Bearer nope"})
        assert r.status_code == 401 and "wrong" in r.json()["error"]
        assert c.get("/model").status_code == 401 and c.post("/reload").status_code == 401
        r = c.post("/predict", params={"category": cat}, content=data, headers={"authorization": "Bearer s3cret"})
        assert r.status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_uvicorn_on_loopback_reload_under_concurrent_requests_drops_none(bundle, tmp_path):
    import shutil

    import httpx

    bdir, images, pred = bundle
    cat = next(iter(images))
    other = tmp_path / "bundle2"
    shutil.copytree(bdir, other)
    token = tmp_path / "token"
    token.write_text("t0ken\n")
    port = _free_port()
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "anomaly_core.cli", "serve", str(bdir), "--port", str(port),
                             "--token-file", str(token), "--batch-wait-ms", "30"], cwd=REPO, stdout=log,
                            stderr=subprocess.STDOUT, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
    base, auth = f"http://127.0.0.1:{port}", {"authorization": "Bearer t0ken"}
    try:
        for _ in range(300):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
        paths = images[cat]
        results, failures = [], []

        def client(n):
            with httpx.Client(base_url=base, headers=auth, timeout=60) as h:
                for i in range(n):
                    k = i % len(paths)
                    r = h.post("/predict", params={"category": cat}, content=Path(paths[k]).read_bytes(),
                               headers={"content-type": "image/png"})
                    (results if r.status_code == 200 else failures).append((k, r))

        threads = [threading.Thread(target=client, args=(12,)) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        with httpx.Client(base_url=base, headers=auth, timeout=60) as h:
            rel = h.post("/reload", params={"bundle": str(other)})
            bad = h.post("/reload", params={"bundle": str(tmp_path / "missing")})
        for t in threads:
            t.join()
        assert rel.status_code == 200, rel.text
        assert bad.status_code == 400 and "still serving" in bad.json()["error"]
        assert failures == [] and len(results) == 72
        # micro-batches of varying composition: predict's own batch-size dependence (float16 feature rounding of a
        # batched conv), measured ~4e-5 here, bounds the difference; an unbatched request equals batch-size 1
        for k, r in results:
            assert abs(r.json()["results"][0]["score"] - pred["single"][cat][k]) <= 2e-4
        health = httpx.get(base + "/health").json()
        assert health["batches"] < 72  # concurrent requests shared forward passes
        model = httpx.get(base + "/model", headers=auth).json()
        assert model["bundle"] == str(other)
        proc.send_signal(__import__("signal").SIGHUP)  # reload the same directory
        for _ in range(100):
            time.sleep(0.2)
            again = httpx.get(base + "/model", headers=auth).json()
            if again["loaded_at"] > model["loaded_at"]:
                break
        assert again["loaded_at"] > model["loaded_at"] and again["bundle"] == str(other)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def test_index_shows_the_review_page_of_the_bundles_method(bundle, tmp_path):
    """`/` embeds the review page filtered to the bundle's method; /review/ serves it and its images, behind the
    token like every route but /health; a --review folder without index.html is refused in one line."""
    from anomaly_core import review
    from anomaly_core.data import manifest as mf
    from anomaly_core.deploy.serve import ServeConfig, create_app
    from anomaly_core.deploy.thresholds import ThresholdConfig
    from anomaly_core.errors import DataError
    from anomaly_core.store import save_scores
    from test_export import SIZE, tiny_knn_run

    bdir = bundle[0]
    rows, _, _, scores = tiny_knn_run(tmp_path / "run")
    for split in ("val", "test"):
        save_scores(tmp_path / "scores" / "knn" / f"{split}.safetensors", scores[split])
    verdicts = review.write_review(rows, {"knn": tmp_path / "scores" / "knn"}, SIZE, ThresholdConfig(), 0, {}, {},
                                   tmp_path / "reports")
    cat = mf.categories(rows)[0]
    thumb = verdicts["methods"]["knn"][cat]["images"][0]["thumb"]
    with _client(bdir, review=tmp_path / "reports" / "review") as c:
        page = c.get("/").text
        assert "<form" in page and 'src="review/index.html?method=knn"' in page
        r = c.get("/review/index.html")
        assert r.status_code == 200 and 'class="threshold-line"' in r.text and 'data-method="knn"' in r.text
        img = c.get(f"/review/{thumb}")
        assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg"
        assert img.content == (tmp_path / "reports" / "review" / thumb).read_bytes()
        assert c.get("/review/../model.json").status_code == 404
    with _client(bdir, review=tmp_path / "reports" / "review", token="s3cret") as c:
        assert c.get(f"/review/{thumb}").status_code == 401
        assert c.get(f"/review/{thumb}", headers={"authorization": "Bearer s3cret"}).status_code == 200
    with _client(bdir) as c:
        assert "--review reports/review" in c.get("/").text and c.get("/review/index.html").status_code == 404
    with pytest.raises(DataError, match=r"--review .*nothing: no index.html there"):
        create_app(bdir, ServeConfig(review=tmp_path / "nothing"))


def test_idle_server_returns_freed_memory_once_per_idle_period(bundle):
    """After --trim-idle-s without a request the server calls malloc_trim once (not again while still idle);
    --trim-idle-s 0 never does."""
    bdir, images, _ = bundle
    cat, paths = next(iter(images.items()))
    body = Path(paths[0]).read_bytes()
    with _client(bdir, trim_idle_s=0.05) as c:
        def predict_then_trims() -> int:  # memory_trims once the idle period after one request has been trimmed
            before = c.get("/health").json()["memory_trims"]  # /health is no activity
            assert c.post("/predict", params={"category": cat}, content=body,
                          headers={"content-type": "image/png"}).status_code == 200
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                now = c.get("/health").json()["memory_trims"]
                if now > before:
                    return now - before
                time.sleep(0.1)
            raise AssertionError("no memory trim within 20 s of idleness")

        assert predict_then_trims() == 1
        first = c.get("/health").json()["memory_trims"]
        time.sleep(0.5)  # still idle (health probes only): no second trim
        assert c.get("/health").json()["memory_trims"] == first
        assert predict_then_trims() == 1
    with _client(bdir, trim_idle_s=0) as c:
        c.post("/predict", params={"category": cat}, content=body, headers={"content-type": "image/png"})
        time.sleep(0.3)
        assert c.get("/health").json()["memory_trims"] == 0
