"""`anomaly-core serve BUNDLE`: an HTTP inference server over an exported bundle (FastAPI + uvicorn, `serve` extra).

One scoring path with `anomaly-core predict`: the same card reader and category check (`deploy/predict.py`), the
same engine (`deploy/engines.load_predictor`), the same decoder (`features.load_resized`, here on the upload's
bytes), so a served score equals predict's. Concurrent requests are micro-batched: the first waiting request opens
a window of `batch_wait_ms`, every request of the same category that arrives in it (up to `max_batch` images) goes
through one forward pass. A transductive bundle (MuSc) scores each request as its own pool, never mixed.

Bad input never reaches the model: each upload is checked for size (bytes, pixels), emptiness, format and
decodability before scoring, and a bad one is a 4xx with one line naming it. Anything else is a 500 carrying a
request id that the log line has too.
"""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
import base64
import hmac
import io
import logging
import math
import re
import signal
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request as RawRequest

from anomaly_core.deploy.bundle import read_card
from anomaly_core.deploy.engines import load_predictor
from anomaly_core.deploy.predict import resolve_category
from anomaly_core.errors import DataError

__all__ = ["ServeConfig", "LoadedModel", "BadInput", "create_app", "decode_upload", "ACCEPTED_FORMATS"]

log = logging.getLogger("anomaly_core.serve")
_RID = re.compile(r"[A-Za-z0-9._-]{1,64}")

ACCEPTED_FORMATS = ("PNG", "JPEG", "BMP", "TIFF")  # what the dataset readers accept (data.images.IMAGE_EXTENSIONS)


@dataclass
class ServeConfig:
    """The server's limits and behaviour (every field is a `serve` flag)."""

    max_bytes: int = 20_000_000        # per uploaded image
    max_pixels: int = 40_000_000       # width x height per uploaded image (checked from the header, before decoding)
    max_images: int = 32               # per request
    batch_wait_ms: float = 5.0         # micro-batching window
    max_batch: int = 16                # images per forward pass
    max_inflight: int = 64             # requests read / scored at once (bounds memory: max_inflight x body limit)
    token: Optional[str] = None        # bearer token (from --token-file); None: no auth
    review: Optional[Path] = None      # the experiment's review page folder (reports/review), served at /review/
    trim_idle_s: float = 1.0           # after this long without a request, freed memory goes back to the OS (0: never)

    def __post_init__(self):
        for name in ("max_bytes", "max_pixels", "max_images", "max_batch", "max_inflight"):
            if int(getattr(self, name)) < 1:
                raise DataError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if self.batch_wait_ms < 0:
            raise DataError(f"--batch-wait-ms {self.batch_wait_ms}: must be >= 0")
        if self.trim_idle_s < 0:
            raise DataError(f"--trim-idle-s {self.trim_idle_s}: must be >= 0")


class BadInput(Exception):
    """A client error: HTTP `status` and one line naming the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class LoadedModel:
    """A bundle's card and engine, loaded and checked (one forward pass on a blank image per category)."""

    bundle: Path
    card: dict
    engine: Any
    loaded_at: float = field(default_factory=time.time)

    @classmethod
    def load(cls, bundle: str | Path) -> "LoadedModel":
        bundle = Path(bundle)
        card = read_card(bundle)
        engine = load_predictor(bundle, card)
        model = cls(bundle, card, engine)
        model.check()
        return model

    def check(self) -> None:
        """Score a blank image per category (through files, as predict does): the engine runs and its scores are
        finite, else a DataError naming the bundle."""
        import torch
        from PIL import Image

        s, n = self.engine.image_size, 2 if self.engine.transductive else 1
        with tempfile.TemporaryDirectory(prefix="anomaly-core-check-") as tmp:
            paths = [Path(tmp) / f"blank{i}.png" for i in range(n)]
            for i, p in enumerate(paths):
                Image.new("RGB", (s, s), (128 + i, 128, 128)).save(p)
            blank = torch.from_numpy(np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths]))
            for cat in self.card["categories"]:
                scores, _ = self.engine(blank, cat, paths)
                if not bool(torch.isfinite(scores).all()):
                    raise DataError(f"{self.bundle}: category {cat} scores a blank image as {scores.tolist()}")

    def threshold(self, cat: str) -> float:
        t = self.card.get("thresholds", {}).get(cat)
        return float(t["image"]) if t and t.get("image") is not None else float("nan")

    @property
    def threshold_source(self) -> str:
        mode = (self.card.get("threshold") or {}).get("mode", "?")
        note = (self.card.get("protocol") or {}).get("threshold_note", "")
        return f"val ({mode}){': ' + note if note else ''}"

    def info(self) -> dict:
        return {"bundle": str(self.bundle), "method": self.card.get("method"), "kind": self.card.get("kind"),
                "categories": self.card["categories"], "image_size": self.engine.image_size,
                "transductive": bool(self.engine.transductive), "loaded_at": self.loaded_at}


def decode_upload(data: bytes, name: str, size: int, cfg: ServeConfig) -> np.ndarray:
    """An upload's bytes -> uint8 [size, size, 3] through predict's decoder (`features.load_resized`); a BadInput
    naming `name` for empty, oversized (bytes or pixels), wrong-format or undecodable data."""
    from PIL import Image

    from anomaly_core.features import load_resized

    if not data:
        raise BadInput(400, f"{name}: empty upload")
    if len(data) > cfg.max_bytes:
        raise BadInput(413, f"{name}: {len(data)} bytes exceeds --max-bytes {cfg.max_bytes}")
    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt, (w, h) = im.format, im.size
    except Exception as exc:  # noqa: BLE001 - PIL raises several kinds for garbage
        raise BadInput(400, f"{name}: not a readable image ({type(exc).__name__})") from None
    if fmt not in ACCEPTED_FORMATS:
        raise BadInput(415, f"{name}: format {fmt} not accepted ({', '.join(ACCEPTED_FORMATS)})")
    if w * h > cfg.max_pixels:
        raise BadInput(413, f"{name}: {w} x {h} pixels exceeds --max-pixels {cfg.max_pixels}")
    try:
        return load_resized(io.BytesIO(data), size)
    except DataError as exc:
        cause = exc.__cause__ or exc
        raise BadInput(400, f"{name}: cannot decode {fmt} image ({str(cause).splitlines()[0][:200]})") from None


def heatmap_png(image: np.ndarray, amap: np.ndarray, card: dict, cat: str) -> str:
    """predict's overlay (`viz.map_overlay`, the bundle's val map range) as a base64 PNG."""
    from PIL import Image

    from anomaly_core.viz import map_overlay

    lo, hi = card.get("map_range", {}).get(cat, (None, None))
    if lo is None:
        lo, hi = float(amap.min()), float(amap.max())
    buf = io.BytesIO()
    Image.fromarray(map_overlay(image, amap, lo, hi)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class _Job:
    images: list[np.ndarray]
    data: list[bytes]           # the uploads' bytes: an engine whose branches decode at another size re-reads them
    category: str
    future: asyncio.Future


class Scorer:
    """The current model and the micro-batcher: jobs queue up, one worker thread runs the forward passes."""

    def __init__(self, model: LoadedModel, cfg: ServeConfig):
        self.model = model
        self.cfg = cfg
        self.queue: asyncio.Queue[_Job] | None = None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="score")
        self.reload_lock = threading.Lock()
        self.batches = 0
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
        self.pool.shutdown(wait=False)

    async def score(self, images: list[np.ndarray], data: list[bytes], category: str):
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(images, data, category, fut))
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        pending: list[_Job] = []
        while True:
            job = pending.pop(0) if pending else await self.queue.get()
            model = self.model  # one model for the whole batch (a reload swaps self.model between batches)
            batch = [job]
            n = len(job.images)
            if not model.engine.transductive:
                deadline = loop.time() + self.cfg.batch_wait_ms / 1000
                while n < self.cfg.max_batch:
                    timeout = deadline - loop.time()
                    if timeout <= 0 and self.queue.empty():
                        break
                    try:
                        nxt = await asyncio.wait_for(self.queue.get(), max(timeout, 0))
                    except asyncio.TimeoutError:
                        break
                    if nxt.category != job.category or n + len(nxt.images) > self.cfg.max_batch:
                        pending.append(nxt)  # next batch
                        break
                    batch.append(nxt)
                    n += len(nxt.images)
            try:
                scores, maps = await loop.run_in_executor(self.pool, self._forward, model, batch)
            except Exception as exc:  # noqa: BLE001 - handed to each waiting request (a 500 with its id)
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(exc)
                continue
            self.batches += 1
            k = 0
            for j in batch:
                m = len(j.images)
                if not j.future.done():
                    j.future.set_result((model, scores[k : k + m], maps[k : k + m]))
                k += m

    @staticmethod
    def _forward(model: LoadedModel, batch: list[_Job]):
        import torch

        cat = batch[0].category
        if cat not in model.card["categories"]:  # the bundle was reloaded without this category
            raise BadInput(422, f"category {cat!r} is not in the bundle (has {', '.join(model.card['categories'])})")
        images = torch.from_numpy(np.stack([im for j in batch for im in j.images]))
        with tempfile.TemporaryDirectory(prefix="anomaly-core-serve-") as tmp:  # files, as predict passes its inputs
            paths = []
            for n, data in enumerate(d for j in batch for d in j.data):
                paths.append(Path(tmp) / f"{n:04d}")
                paths[-1].write_bytes(data)
            scores, maps = model.engine(images, cat, paths)
        return scores.numpy(), maps.numpy()

    async def reload(self, bundle: str | Path) -> LoadedModel:
        """Load and check `bundle` beside the serving model (which keeps serving), then swap it in."""
        loop = asyncio.get_running_loop()

        def load():
            with self.reload_lock:
                return LoadedModel.load(bundle)

        new = await loop.run_in_executor(None, load)
        if new.engine.image_size != self.model.engine.image_size:
            log.info("reload: image size %s -> %s", self.model.engine.image_size, new.engine.image_size)
        self.model = new
        return new


def create_app(bundle: str | Path, cfg: ServeConfig | None = None, model: LoadedModel | None = None):
    """The FastAPI app serving `bundle` (loaded and checked now, so a bad bundle fails before binding)."""
    cfg = cfg or ServeConfig()
    scorer = Scorer(model or LoadedModel.load(bundle), cfg)
    inflight = {"sem": None}
    activity = {"requests": 0, "running": 0, "trimmed_at": 0, "trims": 0, "last": time.monotonic()}

    async def trim_when_idle():
        """glibc keeps the memory of freed upload bodies, decoded images and batch tensors in its arenas (one per
        request thread); once no request has arrived for `trim_idle_s`, give it back (`runtime.release_memory`)."""
        from anomaly_core.runtime import release_memory

        while True:
            await asyncio.sleep(cfg.trim_idle_s / 2)
            seen = activity["requests"]
            idle = activity["running"] == 0 and time.monotonic() - activity["last"] >= cfg.trim_idle_s
            if idle and seen != activity["trimmed_at"]:
                await asyncio.get_running_loop().run_in_executor(scorer.pool, release_memory)
                activity["trimmed_at"], activity["trims"] = seen, activity["trims"] + 1

    @asynccontextmanager
    async def lifespan(app):
        scorer.start()
        inflight["sem"] = asyncio.Semaphore(cfg.max_inflight)
        loop = asyncio.get_running_loop()

        async def reload_same():  # SIGHUP: reload the serving directory (e.g. after `dvc repro export`)
            try:
                new = await scorer.reload(scorer.model.bundle)
                log.info("SIGHUP: reloaded %s", new.bundle)
            except (DataError, OSError) as exc:
                log.warning("SIGHUP: reload refused, still serving the old model: %s", str(exc).splitlines()[0])

        try:
            loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload_same()))
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread (tests), or no SIGHUP
            pass
        log.info("serving %s (method %s, categories %s)", scorer.model.bundle, scorer.model.card.get("method"),
                 ", ".join(scorer.model.card["categories"]))
        trimmer = loop.create_task(trim_when_idle()) if cfg.trim_idle_s > 0 else None
        yield
        if trimmer is not None:
            trimmer.cancel()
        await scorer.stop()

    app = FastAPI(title="anomaly_core", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scorer = scorer
    app.state.activity = activity
    review = Path(cfg.review) if cfg.review is not None else None
    if review is not None:
        if not (review / "index.html").is_file():
            raise DataError(f"--review {review}: no index.html there (the evaluate stage writes reports/review/)")
        from starlette.staticfiles import StaticFiles

        app.mount("/review", StaticFiles(directory=str(review), html=True), name="review")

    def error(status: int, message: str, rid: str) -> JSONResponse:
        return JSONResponse({"error": message, "request_id": rid}, status_code=status, headers={"X-Request-ID": rid})

    @app.middleware("http")
    async def request_id_and_auth(request: Request, call_next):
        given = request.headers.get("x-request-id", "")  # a reverse proxy's id, kept so both logs share it
        rid = given if _RID.fullmatch(given) else uuid.uuid4().hex[:16]
        request.state.rid = rid
        if cfg.token is not None and request.url.path != "/health":
            auth = request.headers.get("authorization", "")
            if not auth.lower().startswith("bearer "):
                return error(401, "missing bearer token (Authorization: Bearer <token>)", rid)
            if not hmac.compare_digest(auth[7:].strip().encode(), cfg.token.encode()):
                return error(401, "wrong bearer token", rid)
        counted = request.url.path != "/health"  # a load balancer's probes allocate nothing worth trimming
        activity["running"] += counted
        try:
            response = await call_next(request)
        except Exception:  # noqa: BLE001 - the last guard: the server stays up
            log.exception("request %s %s %s failed", rid, request.method, request.url.path)
            return error(500, f"internal error (request id {rid})", rid)
        finally:
            if counted:
                activity["running"] -= 1
                activity["requests"] += 1
                activity["last"] = time.monotonic()
        response.headers["X-Request-ID"] = rid
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return error(422, f"{where}: {first.get('msg', 'invalid request')}", request.state.rid)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error(exc.status_code, str(exc.detail), getattr(request.state, "rid", "-"))

    @app.get("/health")
    async def health():
        m = scorer.model
        return {"status": "ok", "method": m.card.get("method"), "categories": m.card["categories"],
                "batches": scorer.batches, "loaded_at": m.loaded_at, "memory_trims": activity["trims"]}

    @app.get("/model")
    async def card():
        return {**scorer.model.info(), "card": scorer.model.card}

    @app.get("/", response_class=HTMLResponse)
    async def index():
        return HTMLResponse(_index_html(scorer.model, review is not None))

    @app.post("/reload")
    async def reload(request: Request, bundle: Optional[str] = None):
        rid = request.state.rid
        target = bundle or str(scorer.model.bundle)
        try:
            new = await scorer.reload(target)
        except (DataError, OSError) as exc:
            log.warning("request %s: reload of %s refused: %s", rid, target, exc)
            return error(400, f"reload refused, still serving {scorer.model.bundle}: {str(exc).splitlines()[0]}", rid)
        log.info("request %s: reloaded %s", rid, target)
        return {"status": "reloaded", **new.info()}

    async def read_uploads(request: Request) -> list[tuple[str, bytes]]:
        """The request's images: multipart files (any field name) or the raw body."""
        limit = cfg.max_bytes * cfg.max_images + 1_000_000
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise BadInput(413, f"request body of {length} bytes exceeds {limit} (--max-bytes x --max-images)")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise BadInput(413, f"request body exceeds {limit} bytes (--max-bytes x --max-images)")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "multipart/form-data":
            data = bytes(body)

            async def receive():
                return {"type": "http.request", "body": data, "more_body": False}

            try:
                form = await RawRequest(request.scope, receive).form(max_files=cfg.max_images, max_fields=16)
            except Exception as exc:  # noqa: BLE001 - malformed multipart, too many parts
                detail = str(getattr(exc, "detail", exc))
                if "Too many files" in detail:
                    raise BadInput(413, f"more than --max-images {cfg.max_images} images in the request") from None
                raise BadInput(400, f"malformed multipart body: {detail}") from None
            files = [(v.filename or k, await v.read()) for k, v in form.multi_items() if hasattr(v, "read")]
            if not files:
                raise BadInput(400, "multipart body has no file part")
            return files
        if ctype and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
            raise BadInput(415, f"content type {ctype}: send multipart/form-data, image/* or application/octet-stream")
        return [("body", bytes(body))]

    @app.post("/predict")
    async def predict(request: Request, category: Optional[str] = None, heatmap: bool = False):
        rid = request.state.rid
        async with inflight["sem"]:
            try:
                uploads = await read_uploads(request)
                if len(uploads) > cfg.max_images:
                    raise BadInput(413, f"{len(uploads)} images exceeds --max-images {cfg.max_images}")
                model = scorer.model
                try:
                    cat = resolve_category(model.card, category)
                except DataError as exc:
                    raise BadInput(422, str(exc).replace("--category", "category").replace(": pass category",
                                                                                          ": pass ?category=")) from None
                size = model.engine.image_size
                images = [decode_upload(data, name, size, cfg) for name, data in uploads]
                model, scores, maps = await scorer.score(images, [d for _, d in uploads], cat)
            except BadInput as exc:
                log.info("request %s: %d %s", rid, exc.status, exc)
                return error(exc.status, str(exc), rid)
        t = model.threshold(cat)
        results = []
        for (name, _), im, s, m in zip(uploads, images, scores, maps):
            s = float(s)
            r = {"name": name, "category": cat, "score": s,
                 "is_anomalous": bool(s >= t) if not math.isnan(t) else None, "threshold": t,
                 "threshold_source": model.threshold_source}
            if heatmap:
                r["heatmap_png"] = heatmap_png(im, m, model.card, cat)
            results.append(r)
        return {"request_id": rid, "method": model.card.get("method"), "results": results}

    return app


def _index_html(model: LoadedModel, review: bool = False) -> str:
    """The bundle's page: its card summary, an upload form posting to /predict and, with `review`, the experiment's
    review page (/review/) filtered to the bundle's method (no external resources)."""
    import html
    import json

    cats = "".join(f"<option>{html.escape(c)}</option>" for c in model.card["categories"])
    rows = "".join(f"<tr><td>{html.escape(c)}</td><td>{model.threshold(c):.6g}</td></tr>"
                   for c in model.card["categories"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>anomaly_core: {html.escape(str(model.card.get('method')))}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 8px;border-bottom:1px solid #ccc}}
#out img{{max-width:256px}}.bad{{color:#b00}}.ok{{color:#070}}</style></head><body>
<h1>anomaly_core bundle: {html.escape(str(model.card.get('method')))}</h1>
<p>{html.escape(str(model.bundle))} · threshold source: {html.escape(model.threshold_source)}</p>
<table><tr><th>category</th><th>image threshold</th></tr>{rows}</table>
<h2>Score an image</h2>
<form id="f"><input type="file" name="file" accept="image/png,image/jpeg,image/bmp,image/tiff" multiple>
<select name="category">{cats}</select><button>predict</button></form><div id="out"></div>
<script>
const card = {json.dumps({"method": model.card.get("method")})};
document.getElementById('f').onsubmit = async (e) => {{
  e.preventDefault();
  const fd = new FormData(); const f = e.target;
  for (const file of f.file.files) fd.append('file', file);
  const r = await fetch('predict?heatmap=true&category=' + encodeURIComponent(f.category.value), {{method: 'POST', body: fd}});
  const j = await r.json(); const out = document.getElementById('out'); out.innerHTML = '';
  if (!r.ok) {{ out.textContent = r.status + ': ' + j.error; return; }}
  for (const x of j.results) {{
    const d = document.createElement('div');
    d.innerHTML = '<p class="' + (x.is_anomalous ? 'bad' : 'ok') + '">' + x.name + ': score ' + x.score.toFixed(5) +
      (x.is_anomalous ? ' ANOMALOUS' : ' normal') + ' (threshold ' + x.threshold.toFixed(5) + ')</p>' +
      '<img src="data:image/png;base64,' + x.heatmap_png + '">';
    out.appendChild(d);
  }}
}};
</script>{_review_frame(model, review)}</body></html>"""


def _review_frame(model: LoadedModel, review: bool) -> str:
    """The review page of the bundle's method (test images by score, val threshold, FP / FN), or where to get it."""
    import html
    from urllib.parse import quote

    if not review:
        return ("<h2>Review</h2><p>No review page served: start with <code>--review reports/review</code> (written by "
                "<code>dvc repro evaluate</code>).</p>")
    url = f"review/index.html?method={quote(str(model.card.get('method', '')))}"
    return (f'<h2>Review: {html.escape(str(model.card.get("method")))} on the test split</h2><p><a href="{url}">open '
            f'full page</a> (all methods: <a href="review/index.html">review/</a>)</p>'
            f'<iframe id="review" src="{url}" style="width:100%;height:80vh;border:1px solid #ccc"></iframe>')
