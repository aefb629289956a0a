"""Bounded load test of `anomaly-core serve` on loopback, beside `predict`'s batched throughput in the same run.

    python scripts/loadtest.py models/export data/demo --clients 8 --requests 2000 --bad 200 --time-limit 900

1. predict: `deploy.predict.predict_files` over the images (batch 16), after one warm-up call; model load excluded
   (a warm 1-image call per category is timed after the batched one and subtracted) -> images/s.
2. serve: `anomaly-core serve BUNDLE` in a subprocess on 127.0.0.1 (a free port), a warm-up (each client 4 requests), then
   CLIENTS threads post the images (raw bytes, `?category=` from the folder) until REQUESTS good requests and BAD
   bad uploads (corrupt, empty, GIF, too many pixels, cycled, spread evenly) are sent or TIME_LIMIT passes.
   Reported: good requests/s, p50/p95/p99 latency, errors (a good request not 200, a bad one not 4xx), the
   server's RSS at start (--settle idle seconds after the warm-up), peak, and at the end (--settle idle seconds
   after the last request; the server returns freed memory after --trim-idle-s idle); /health after the run.
Prints one JSON object (also to --out). Loopback only: it starts its own server and talks to nothing else.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def demo_images(root: Path, categories: list[str]) -> list[tuple[str, Path]]:
    """(category, path) of the test images under root/<category>/test (MVTec layout), sorted."""
    from anomaly_core.data.images import is_image_file

    out = []
    for cat in categories:
        out += [(cat, p) for p in sorted((root / cat / "test").rglob("*")) if p.is_file() and is_image_file(p)]
    if not out:
        raise SystemExit(f"error: no test images of {', '.join(categories)} under {root}")
    return out


def bad_uploads() -> list[tuple[str, bytes, str]]:
    from PIL import Image

    gif, big = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    Image.new("L", (9000, 9000)).save(big, format="PNG")  # 81 Mpx > the default --max-pixels, a small file
    return [("corrupt", b"\x89PNG\r\n\x1a\n" + os.urandom(2000), "image/png"), ("empty", b"", "image/png"),
            ("gif", gif.getvalue(), "image/gif"), ("pixels", big.getvalue(), "image/png")]


def predict_rate(bundle: Path, items: list[tuple[str, Path]], tmp: Path) -> dict:
    from anomaly_core.deploy.predict import predict_files

    by_cat: dict[str, list[Path]] = {}
    for c, p in items:
        by_cat.setdefault(c, []).append(p)
    n, secs = 0, 0.0
    predict_files(bundle, [items[0][1]], tmp / "warm", category=items[0][0], progress=False)  # one-off start-up
    for c, paths in by_cat.items():
        t0 = time.perf_counter()
        predict_files(bundle, paths, tmp / "pn", category=c, batch_size=16, progress=False)
        t1 = time.perf_counter()
        predict_files(bundle, paths[:1], tmp / "p1", category=c, progress=False)  # bundle load + one image, warm
        t2 = time.perf_counter()
        n, secs = n + len(paths) - 1, secs + (t1 - t0) - (t2 - t1)
    if secs <= 0:  # the subtraction is only meaningful when the batched call dominates
        raise SystemExit(f"loadtest: predict timing came out {secs:.2f} s over {n} images (too few images per "
                         "category to separate the bundle load from scoring)")
    return {"images": n, "seconds": round(secs, 2), "images_per_s": round(n / secs, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("images", type=Path, help="an MVTec-layout root (<category>/test/...), e.g. data/demo")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--bad", type=int, default=200)
    ap.add_argument("--time-limit", type=float, default=900.0, help="seconds for the load phase")
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--trim-idle-s", type=float, default=1.0, help="the server's --trim-idle-s (0: never trim)")
    ap.add_argument("--settle", type=float, default=3.0,
                    help="idle seconds before the start and the end RSS are read (both idle states)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import httpx

    from anomaly_core.deploy.bundle import read_card
    from anomaly_core.runtime import setup_environment

    setup_environment()  # what the CLI does first (malloc tuning), so predict here runs as `anomaly-core predict`

    card = read_card(args.bundle)
    items = demo_images(args.images, card["categories"])
    tmp = Path(f"/tmp/loadtest-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    result: dict = {"bundle": str(args.bundle), "method": card.get("method"), "images": len(items),
                    "clients": args.clients}
    result["predict"] = predict_rate(args.bundle, items, tmp)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp / "serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "anomaly_core.cli", "serve", str(args.bundle), "--host",
                               "127.0.0.1", "--port", str(port), "--batch-wait-ms", str(args.batch_wait_ms),
                               "--max-batch", str(args.max_batch),
                               "--trim-idle-s", str(args.trim_idle_s)], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
            if server.poll() is not None:
                raise SystemExit(f"error: the server exited: {(tmp / 'serve.log').read_text()[-2000:]}")
        payload = {p: p.read_bytes() for _, p in items}
        def warm(k):  # concurrent, so the start RSS already holds full micro-batches' buffers
            with httpx.Client(base_url=base, timeout=60) as h:
                for i in range(4):
                    c, p = items[(4 * k + i) % len(items)]
                    h.post("/predict", params={"category": c}, content=payload[p],
                           headers={"content-type": "image/png"})

        warmers = [threading.Thread(target=warm, args=(k,)) for k in range(args.clients)]
        for t in warmers:
            t.start()
        for t in warmers:
            t.join()
        time.sleep(args.settle)  # start and end are both read after the same idle time
        rss = {"start": rss_mb(server.pid), "peak": rss_mb(server.pid)}
        stop = threading.Event()

        def sample():
            while not stop.is_set():
                rss["peak"] = max(rss["peak"], rss_mb(server.pid))
                time.sleep(0.05)

        total = args.requests + args.bad
        every = total / max(args.bad, 1)
        bads = bad_uploads()
        counter = iter(range(total))
        lock = threading.Lock()
        lat, errors, bad_4xx = [], [], [0]
        deadline = time.monotonic() + args.time_limit

        def client():
            with httpx.Client(base_url=base, timeout=60) as h:
                while time.monotonic() < deadline:
                    with lock:
                        i = next(counter, None)
                    if i is None:
                        return
                    is_bad = args.bad and int(i % every) == 0 and i // every < args.bad
                    if is_bad:
                        name, data, ctype = bads[int(i // every) % len(bads)]
                        r = h.post("/predict", params={"category": items[0][0]}, content=data,
                                   headers={"content-type": ctype})
                        with lock:
                            if 400 <= r.status_code < 500:
                                bad_4xx[0] += 1
                            else:
                                errors.append(f"bad {name}: {r.status_code}")
                        continue
                    c, p = items[i % len(items)]
                    t0 = time.perf_counter()
                    try:
                        r = h.post("/predict", params={"category": c}, content=payload[p],
                                   headers={"content-type": "image/png"})
                        code = r.status_code
                    except httpx.HTTPError as exc:
                        code = type(exc).__name__
                    dt = time.perf_counter() - t0
                    with lock:
                        (lat.append(dt) if code == 200 else errors.append(f"{p.name}: {code}"))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        secs = time.perf_counter() - t0
        time.sleep(args.settle)
        stop.set()
        rss["end"] = rss_mb(server.pid)
        health = httpx.get(base + "/health", timeout=5).json()
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    import numpy as np

    q = np.percentile(np.asarray(lat) * 1000, [50, 95, 99]) if lat else [float("nan")] * 3
    result["serve"] = {"good_requests": len(lat), "bad_requests_4xx": bad_4xx[0], "errors": len(errors),
                       "error_examples": errors[:5], "seconds": round(secs, 2),
                       "requests_per_s": round(len(lat) / secs, 2),
                       "latency_ms": {"p50": round(q[0], 1), "p95": round(q[1], 1), "p99": round(q[2], 1)},
                       "forward_passes": health.get("batches"), "healthy_after": health.get("status") == "ok",
                       "rss_mb": {k: round(v, 1) for k, v in rss.items()},
                       "rss_end_vs_start": round(rss["end"] / rss["start"], 3),
                       "timed_out": len(lat) + bad_4xx[0] + len(errors) < total}
    result["serve_vs_predict"] = round(result["serve"]["requests_per_s"] / result["predict"]["images_per_s"], 3)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
