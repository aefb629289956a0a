"""The review page (`reports/review/index.html`, written by `evaluate`) and the compare page of two experiments
(`anomaly-core review EXP_A EXP_B`).

The review page is plain HTML with a little inline CSS / JS and no external resource: per category and method the
test images sorted by score (low to high) with the val threshold drawn between them and on a score axis, false
positives / false negatives marked, a click showing the image's heatmap overlay (ground-truth contour in lime);
the ROC / PR figures and the per-category table. Images are small JPEG files beside the page:

    reports/review/index.html     the page
    reports/review/verdicts.json  per method, category and test image: score, threshold, verdict, mark (the
                                  compare command reads it)
    reports/review/img/<category>/<n>.jpg              thumbnail of the n-th test image (manifest order)
    reports/review/heat/<method>/<category>/<n>.jpg    its heatmap overlay
    reports/review/{roc,pr}.png                        copies of reports/{roc,pr}.png

Thresholds are the export stage's rule (`deploy.thresholds.choose_threshold`, image level) on the same val rows no
method trained on (`data.holdout.selection_rows`), so the exported method's page threshold equals the bundle's.
An image is anomalous when score >= threshold.
"""
from __future__ import annotations

import html
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from anomaly_core import evaluation as ev
from anomaly_core.data import manifest as mf
from anomaly_core.data.holdout import selection_rows
from anomaly_core.deploy.thresholds import ThresholdConfig, choose_threshold
from anomaly_core.errors import DataError
from anomaly_core.features import load_resized
from anomaly_core.io import jsonable, replace_dir, write_json, write_text
from anomaly_core.store import load_scores
from anomaly_core.viz import map_overlay

__all__ = ["THUMB", "FORMAT", "mark", "category_verdicts", "write_review", "review_html", "load_verdicts",
           "compare_verdicts", "write_compare"]

FORMAT = 1          # verdicts.json format
THUMB = 128         # thumbnail side, px
HEAT = 224          # heatmap overlay side (at most), px
TABLE_METRICS = ("image_auroc", "image_ap", "image_f1max", "pixel_auroc", "pixel_aupro", "pixel_ap")


def mark(label: int, anomalous: bool) -> str:
    """'tp' | 'fp' | 'fn' | 'tn' of one image (label 1 = anomalous)."""
    return ("t" if bool(label) == bool(anomalous) else "f") + ("p" if anomalous else "n")


def category_verdicts(ids: Sequence[str], labels: np.ndarray, scores: np.ndarray, threshold: float) -> list[dict]:
    """Per test image (given order): {id, label, score, anomalous (score >= threshold), mark}."""
    out = []
    for i, y, s in zip(ids, np.asarray(labels).tolist(), np.asarray(scores, dtype=np.float64).tolist()):
        a = bool(s >= threshold)
        out.append({"id": i, "label": int(y), "score": s, "anomalous": a, "mark": mark(y, a)})
    return out


def _save_jpeg(path: Path, rgb: np.ndarray, side: int) -> None:
    im = Image.fromarray(rgb)
    if im.size != (side, side):
        im = im.resize((side, side), Image.BILINEAR)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, format="JPEG", quality=85)


def _edges(mask: np.ndarray | None) -> np.ndarray | None:
    """bool [H, W] the border pixels of a ground-truth mask [H, W] (mask pixels with a non-mask 4-neighbour)."""
    if mask is None or not np.asarray(mask).any():
        return None
    from scipy import ndimage

    m = np.asarray(mask, dtype=bool)
    return m & ~ndimage.binary_erosion(m, border_value=1)


def write_review(rows: Sequence[mf.Row], dirs: Mapping[str, Path], size: int, tcfg: ThresholdConfig, seed: int,
                 holdouts: Mapping[str, float], per_category: Mapping[str, dict], reports: Path,
                 out: Path | None = None) -> dict:
    """Write the review page of the methods in `dirs` ({method: score directory}) to `out` (reports/review),
    built in a temporary directory and swapped in whole. Returns the verdicts written to verdicts.json."""
    reports = Path(reports)
    out = Path(out) if out is not None else reports / "review"
    _remove_stale(out)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        verdicts = _build(rows, dirs, size, tcfg, seed, holdouts, per_category, reports, tmp)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return verdicts


def _remove_stale(out: Path) -> None:
    """Delete `<out>.tmp-<pid>` / `<out>.old-<pid>` trees of a killed run (their process is gone)."""
    for p in out.parent.glob(f"{out.name}.*-*"):
        kind, _, pid = p.name[len(out.name) + 1:].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and p.is_dir():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                shutil.rmtree(p, ignore_errors=True)
            except PermissionError:
                pass


def _build(rows, dirs, size, tcfg, seed, holdouts, per_category, reports: Path, out: Path) -> dict:
    out.mkdir(parents=True)
    cats = mf.categories(rows)
    pixel = ev.has_masks(rows)
    test = {c: mf.rows_for(rows, c, "test") for c in cats}
    chosen = selection_rows(rows, seed, holdouts)
    val = {c: [r for r in chosen if r.category == c] for c in cats}
    images: dict[str, list[np.ndarray]] = {}
    thumbs: dict[str, list[str]] = {}
    heat_side = min(size, HEAT)
    for c in cats:  # one decoded copy per test image, shared by every method
        images[c] = [np.asarray(Image.fromarray(load_resized(r.image, size)).resize((heat_side, heat_side),
                                                                                       Image.BILINEAR))
                     for r in test[c]]
        thumbs[c] = [f"img/{c}/{n:04d}.jpg" for n in range(len(test[c]))]
        for im, rel in zip(images[c], thumbs[c]):
            _save_jpeg(out / rel, im, THUMB)
    edges = {c: [_edges(m) for m in ev.masks_for(test[c], heat_side)] if pixel else [None] * len(test[c])
             for c in cats}  # ground-truth contours drawn on every method's overlay
    methods: dict[str, dict] = {}
    for method, where in dirs.items():
        t_scores, v_scores = load_scores(Path(where) / "test.safetensors"), load_scores(Path(where) / "val.safetensors")
        methods[method] = {}
        for c in cats:
            v_image, v_maps = ev.align(val[c], *v_scores[c])
            t, notes = choose_threshold([r.label for r in val[c]], v_image, tcfg.mode, tcfg.fpr, tcfg.value,
                                        f"{method} {c} image")
            image, maps = ev.align(test[c], *t_scores[c])
            labels = np.array([r.label for r in test[c]])
            items = category_verdicts([r.id for r in test[c]], labels, image, t)
            lo, hi = float(np.percentile(v_maps, 1)), float(np.percentile(v_maps, 99.9))  # the bundle's map_range
            for n, (item, r) in enumerate(zip(items, test[c])):
                item["defect_type"], item["thumb"] = r.defect_type, thumbs[c][n]
                item["heat"] = f"heat/{method}/{c}/{n:04d}.jpg"
                overlay = map_overlay(images[c][n], maps[n].astype(np.float32), lo, hi)
                if edges[c][n] is not None:
                    overlay[edges[c][n]] = (0, 255, 0)
                _save_jpeg(out / item["heat"], overlay, heat_side)
            counts = {k: sum(i["mark"] == k for i in items) for k in ("tp", "fp", "fn", "tn")}
            methods[method][c] = {"threshold": t, "warnings": notes, "counts": counts, "map_range": [lo, hi],
                                  "images": items}
    for name in ("roc.png", "pr.png"):
        if (reports / name).is_file():
            shutil.copyfile(reports / name, out / name)
    verdicts = jsonable({"format": FORMAT, "threshold": vars(tcfg), "rule": "anomalous when score >= threshold",
                         "threshold_rows": "val rows no method trained on (data.holdout.selection_rows)",
                         "categories": cats, "methods": methods}, 12)
    write_json(out / "verdicts.json", verdicts)
    write_text(out / "index.html", review_html(verdicts, per_category,
                                               curves=[n for n in ("roc.png", "pr.png") if (out / n).is_file()]))
    return verdicts


# --------------------------------------------------------------------------- HTML

_CSS = """body{font-family:sans-serif;margin:1em 2em;color:#222}h2{margin-top:1.4em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;font-size:13px}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}
td:first-child,td:nth-child(2),th{text-align:left}.strip{margin:.6em 0 1.2em}.strip h3{font-size:14px;margin:.2em 0}
.row{display:flex;flex-wrap:wrap;align-items:flex-end;gap:4px}.tile{margin:0;position:relative;cursor:pointer;
border:3px solid transparent}.tile img{width:96px;height:96px;display:block}.tile figcaption{font-size:11px;
text-align:center}.tile.fp{border-color:#e08000}.tile.fn{border-color:#c00020}.tile.tp{border-color:#bbb}
.mark{position:absolute;top:2px;left:2px;color:#fff;font:bold 11px sans-serif;padding:0 3px}.fp .mark{background:#e08000}
.fn .mark{background:#c00020}.threshold{width:4px;align-self:stretch;background:#06c;position:relative;min-height:110px}
.threshold span{position:absolute;top:-2px;left:6px;font-size:11px;color:#06c;white-space:nowrap}
svg.axis{display:block;margin:.2em 0}.legend span{margin-right:1em}#box{display:none;position:fixed;inset:0;
background:rgba(0,0,0,.75);align-items:center;justify-content:center;flex-direction:column;color:#fff}
#box img{width:336px;height:336px;margin:4px;image-rendering:auto}#box.on{display:flex}nav a{margin-right:.8em}"""

_JS = """const q=new URLSearchParams(location.search).get('method');
function only(m){document.querySelectorAll('.strip,tr[data-method]').forEach(e=>{e.style.display=(!m||e.dataset.method===m)?'':'none'});
 document.getElementById('method').value=m||'';}
document.getElementById('method').onchange=e=>only(e.target.value);if(q)only(q);
const box=document.getElementById('box');
document.querySelectorAll('.tile').forEach(t=>t.onclick=()=>{const i=t.querySelector('img');if(!i||!i.dataset.heat)return;
 document.getElementById('box-img').src=i.dataset.thumb;document.getElementById('box-heat').src=i.dataset.heat;
 document.getElementById('box-cap').textContent=t.title;box.classList.add('on');});
box.onclick=()=>box.classList.remove('on');
addEventListener('load',()=>{const im=[...document.querySelectorAll('img[src]')];
 document.body.dataset.images=im.length;document.body.dataset.imagesLoaded=im.filter(i=>i.complete&&i.naturalWidth>0).length;});"""


def _esc(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _axis(items: list[dict], threshold: float, width: int = 640, height: int = 34) -> str:
    """An inline SVG score axis: one tick per test image (red anomalous, green normal; FP / FN taller) and the
    threshold as a blue line."""
    s = [i["score"] for i in items] + [threshold]
    lo, hi = min(s), max(s)
    x = lambda v: 8 + (width - 16) * ((v - lo) / (hi - lo) if hi > lo else 0.5)
    ticks = "".join(f'<line class="tick {i["mark"]}" x1="{x(i["score"]):.1f}" x2="{x(i["score"]):.1f}" '
                    f'y1="{6 if i["mark"] in ("fp", "fn") else 12}" y2="26" stroke="{"#c00020" if i["label"] else "#2a2"}" '
                    f'stroke-width="2"/>' for i in items)
    tx = x(threshold)
    return (f'<svg class="axis" width="{width}" height="{height}" role="img" aria-label="scores and threshold">'
            f'<line x1="8" x2="{width - 8}" y1="26" y2="26" stroke="#999"/>{ticks}'
            f'<line class="threshold-line" x1="{tx:.1f}" x2="{tx:.1f}" y1="0" y2="{height}" stroke="#06c" '
            f'stroke-width="2" stroke-dasharray="4 2"/><text x="8" y="{height - 1}" font-size="9">{lo:.4g}</text>'
            f'<text x="{width - 8}" y="{height - 1}" font-size="9" text-anchor="end">{hi:.4g}</text></svg>')


def _tile(i: dict, extra: str = "") -> str:
    badge = f'<b class="mark">{i["mark"].upper()}</b>' if i["mark"] in ("fp", "fn") else ""
    title = f'{i["id"]} ({i.get("defect_type", "")}) score {i["score"]:.6g} {i["mark"].upper()}{extra}'
    return (f'<figure class="tile {i["mark"]}" title="{_esc(title)}" data-id="{_esc(i["id"])}">{badge}'
            f'<img src="{_esc(i["thumb"])}" data-thumb="{_esc(i["thumb"])}" data-heat="{_esc(i["heat"])}" '
            f'alt="{_esc(i["id"])}"><figcaption>{i["score"]:.4g}</figcaption></figure>')


def _strip(method: str, part: dict) -> str:
    items = sorted(part["images"], key=lambda i: (i["score"], i["id"]))
    t, n = part["threshold"], part["counts"]
    cut = sum(i["score"] < t for i in items)
    line = f'<div class="threshold" title="val threshold {t:.6g}"><span>threshold {t:.4g}</span></div>'
    tiles = [_tile(i) for i in items]
    tiles.insert(cut, line)
    warn = "".join(f'<p class="warn">{_esc(w)}</p>' for w in part.get("warnings", []))
    return (f'<div class="strip" data-method="{_esc(method)}"><h3>{_esc(method)}: val threshold {t:.6g} · '
            f'FP {n["fp"]} · FN {n["fn"]} · TP {n["tp"]} · TN {n["tn"]}</h3>{warn}{_axis(items, t)}'
            f'<div class="row">{"".join(tiles)}</div></div>')


def _table(verdicts: dict, per_category: Mapping[str, dict]) -> str:
    cols = [m for m in TABLE_METRICS if any(m in v for p in per_category.values() if isinstance(p, dict)
                                            for v in p.values() if isinstance(v, dict))]
    head = "".join(f"<th>{c}</th>" for c in cols)
    body = []
    for c in verdicts["categories"]:
        for method, parts in verdicts["methods"].items():
            m, p = per_category.get(method, {}).get(c, {}), parts[c]
            cells = "".join(f"<td>{m[k]:.4f}</td>" if k in m else "<td>-</td>" for k in cols)
            body.append(f'<tr data-method="{_esc(method)}"><td>{_esc(c)}</td><td>{_esc(method)}</td>{cells}'
                        f'<td>{p["threshold"]:.6g}</td><td>{p["counts"]["fp"]}</td><td>{p["counts"]["fn"]}</td></tr>')
    return (f'<table id="metrics"><tr><th>category</th><th>method</th>{head}<th>val threshold</th><th>FP</th>'
            f'<th>FN</th></tr>{"".join(body)}</table>')


def _page(title: str, body: str, methods: Sequence[str]) -> str:
    opts = '<option value="">all methods</option>' + "".join(f'<option value="{_esc(m)}">{_esc(m)}</option>'
                                                             for m in methods)
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{_esc(title)}</title><style>{_CSS}</style>'
            f'</head><body><h1>{_esc(title)}</h1><p>method: <select id="method">{opts}</select></p>{body}'
            '<div id="box"><div><img id="box-img" alt="image"><img id="box-heat" alt="heatmap overlay"></div>'
            f'<p id="box-cap"></p><p>click to close</p></div><script>{_JS}</script></body></html>')


def review_html(verdicts: dict, per_category: Mapping[str, dict], curves: Sequence[str] = ()) -> str:
    """The review page of `verdicts` (the verdicts.json structure) with the metrics table of `per_category`."""
    methods = list(verdicts["methods"])
    tc = verdicts["threshold"]
    nav = "".join(f'<a href="#cat-{_esc(c)}">{_esc(c)}</a>' for c in verdicts["categories"])
    intro = (f'<p>Test images per category and method, sorted by score (low to high). The blue line is the '
             f'threshold chosen on val (mode {_esc(tc["mode"])}, on the val rows no method trained on): images right '
             f'of it are called anomalous (score &gt;= threshold). <b style="color:#e08000">FP</b> = normal image '
             f'called anomalous, <b style="color:#c00020">FN</b> = anomaly missed. Click an image for its heatmap '
             f'overlay (ground-truth contour in lime). Axis ticks: red = anomalous, green = normal.</p><nav>{nav}</nav>')
    figs = "".join(f'<img src="{_esc(n)}" alt="{_esc(n)}" style="max-width:45%">' for n in curves)
    parts = [intro, "<h2>Per-category metrics (test)</h2>", _table(verdicts, per_category)]
    if figs:
        parts += ["<h2>ROC and PR (test, pooled over categories)</h2>", f"<p>{figs}</p>"]
    for c in verdicts["categories"]:
        parts.append(f'<section class="cat" id="cat-{_esc(c)}"><h2>{_esc(c)}</h2>'
                     + "".join(_strip(m, verdicts["methods"][m][c]) for m in methods) + "</section>")
    return _page("anomaly_core review", "".join(parts), methods)


# --------------------------------------------------------------------------- compare two experiments

VERDICTS = "reports/review/verdicts.json"


def load_verdicts(source: str, repo: Path = Path(".")) -> tuple[dict, Callable[[str], bytes], str]:
    """(verdicts, reader of a file beside them, label) of an experiment: a folder (holding verdicts.json, or
    review/ or reports/review/ that does) or a git revision / `dvc exp` name of the DVC repository `repo`
    (read from the local DVC cache through `dvc.fs.DVCFileSystem`, what `dvc.api.read` uses). A missing file is a DataError naming the source."""
    folder = Path(source)
    if folder.is_dir():
        for d in (folder, folder / "review", folder / "reports" / "review"):
            if (d / "verdicts.json").is_file():
                return _checked(json.loads((d / "verdicts.json").read_text()), source), \
                    (lambda rel, d=d: (d / rel).read_bytes()), str(d)
        raise DataError(f"{source}: a folder without verdicts.json (nor review/ or reports/review/ holding one); "
                        "run `dvc repro evaluate` there")
    rev = _resolve_rev(source, repo)
    try:
        from dvc.fs import DVCFileSystem

        fs = DVCFileSystem(url=str(repo), rev=rev)  # one repository view for the file and every thumbnail
        text = fs.read_text(VERDICTS)
    except Exception as exc:  # noqa: BLE001 - dvc raises many kinds: one line naming what was asked
        raise DataError(f"{source}: cannot read {VERDICTS} at revision {rev[:12]} of {repo} "
                        f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); is it an "
                        "experiment of this repository whose evaluate stage wrote the review page?") from None
    reader = lambda rel: fs.read_bytes(f"reports/review/{rel}")
    return _checked(json.loads(text), source), reader, f"{source} ({rev[:10]})"


def _resolve_rev(name: str, repo: Path) -> str:
    """A git revision for `name`: a `dvc exp` name (refs/exps/...) resolved to its commit, else `name` itself."""
    try:
        from dvc.repo import Repo
        from dvc.repo.experiments.utils import resolve_name

        with Repo(str(repo)) as r:
            ref = resolve_name(r.scm, name).get(name)
            if ref is not None:
                return r.scm.get_ref(str(ref))
            return r.scm.resolve_rev(name)
    except Exception:  # noqa: BLE001 - not an experiment name (or not a DVC repo): let git resolve it below
        pass
    return name


def _checked(verdicts: Any, source: str) -> dict:
    if not isinstance(verdicts, dict) or verdicts.get("format") != FORMAT or "methods" not in verdicts:
        raise DataError(f"{source}: verdicts.json is not format {FORMAT} of the review page; re-run `dvc repro evaluate`")
    return verdicts


def compare_verdicts(a: dict, b: dict) -> dict:
    """Where two experiments' verdicts differ, per method and category present in both (images matched by id):
    {"methods": {m: {c: {"threshold": [a, b], "compared": n, "errors": [a, b], "differ": [{id, label, a: {score,
    anomalous, mark}, b: {...}}]}}}, "only_a": [...], "only_b": [...]} (methods present on one side only)."""
    out: dict = {"methods": {}, "only_a": sorted(set(a["methods"]) - set(b["methods"])),
                 "only_b": sorted(set(b["methods"]) - set(a["methods"]))}
    for m in [m for m in a["methods"] if m in b["methods"]]:
        for c in [c for c in a["methods"][m] if c in b["methods"][m]]:
            pa, pb = a["methods"][m][c], b["methods"][m][c]
            ib = {i["id"]: i for i in pb["images"]}
            pairs = [(i, ib[i["id"]]) for i in pa["images"] if i["id"] in ib]
            keep = lambda i: {k: i[k] for k in ("score", "anomalous", "mark")}
            differ = [{"id": x["id"], "label": x["label"], "defect_type": x.get("defect_type", ""),
                       "thumb": x.get("thumb"), "thumb_b": y.get("thumb"), "a": keep(x), "b": keep(y)}
                      for x, y in pairs if x["anomalous"] != y["anomalous"]]
            out["methods"].setdefault(m, {})[c] = {
                "threshold": [pa["threshold"], pb["threshold"]], "compared": len(pairs),
                "errors": [sum(x["mark"] in ("fp", "fn") for x, _ in pairs), sum(y["mark"] in ("fp", "fn") for _, y in pairs)],
                "differ": differ}
    return out


def write_compare(a: tuple[dict, Callable[[str], bytes], str], b: tuple[dict, Callable[[str], bytes], str],
                  out: Path) -> dict:
    """Write `out/index.html` (+ `out/compare.json`, `out/img/`): where the verdicts of `a` and `b` (from
    `load_verdicts`) differ. Built in a temporary directory and swapped in. Returns the comparison."""
    out = Path(out)
    diff = compare_verdicts(a[0], b[0])
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        copied: dict[str, str] = {}
        for parts in diff["methods"].values():
            for part in parts.values():
                for d in part["differ"]:
                    d["img"] = _copy_thumb(d, a[1], b[1], tmp, copied)
        write_json(tmp / "compare.json", jsonable({"a": a[2], "b": b[2], **diff}, 12))
        write_text(tmp / "index.html", compare_html(diff, a[2], b[2]))
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return diff


def _copy_thumb(d: dict, read_a, read_b, out: Path, copied: dict[str, str]) -> str | None:
    """Copy one differing image's thumbnail (A's, else B's) into out/img/; its relative path (None if neither has it)."""
    if d["id"] in copied:
        return copied[d["id"]]
    for rel, read in ((d.get("thumb"), read_a), (d.get("thumb_b"), read_b)):
        if not rel:
            continue
        try:
            data = read(rel)
        except Exception:  # noqa: BLE001 - a missing thumbnail leaves the row without its image
            continue
        dest = f"img/{len(copied):05d}.jpg"
        (out / dest).parent.mkdir(parents=True, exist_ok=True)
        (out / dest).write_bytes(data)
        copied[d["id"]] = dest
        return dest
    return None


def compare_html(diff: dict, label_a: str, label_b: str) -> str:
    """The compare page: per method and category, counts and the images whose verdicts differ."""
    parts = [f'<p>A = <code>{_esc(label_a)}</code>, B = <code>{_esc(label_b)}</code>. Test images whose verdict '
             '(score &gt;= that experiment\'s val threshold) differs between the two; a mark says whether the '
             'verdict was right (TP / TN) or wrong (FP / FN) in each experiment.</p>']
    for side, ms in (("A", diff["only_a"]), ("B", diff["only_b"])):
        if ms:
            parts.append(f"<p>only in {side}: {_esc(', '.join(ms))}</p>")
    rows = []
    for m, parts_ in diff["methods"].items():
        for c, p in parts_.items():
            rows.append(f'<tr data-method="{_esc(m)}"><td>{_esc(c)}</td><td>{_esc(m)}</td><td>{p["compared"]}</td>'
                        f'<td>{len(p["differ"])}</td><td>{p["threshold"][0]:.6g}</td><td>{p["threshold"][1]:.6g}</td>'
                        f'<td>{p["errors"][0]}</td><td>{p["errors"][1]}</td></tr>')
    parts.append('<table id="summary"><tr><th>category</th><th>method</th><th>images</th><th>verdicts differ</th>'
                 '<th>threshold A</th><th>threshold B</th><th>errors A</th><th>errors B</th></tr>'
                 + "".join(rows) + "</table>")
    for m, parts_ in diff["methods"].items():
        for c, p in parts_.items():
            if not p["differ"]:
                continue
            tiles = []
            for d in p["differ"]:
                img = f'<img src="{_esc(d["img"])}" alt="{_esc(d["id"])}">' if d.get("img") else ""
                tiles.append(f'<figure class="tile diff {d["b"]["mark"]}" data-id="{_esc(d["id"])}" '
                             f'title="{_esc(d["id"])} ({_esc(d["defect_type"])})">{img}<figcaption>'
                             f'A {d["a"]["score"]:.4g} <b class="v {d["a"]["mark"]}">{d["a"]["mark"].upper()}</b><br>'
                             f'B {d["b"]["score"]:.4g} <b class="v {d["b"]["mark"]}">{d["b"]["mark"].upper()}</b>'
                             '</figcaption></figure>')
            parts.append(f'<div class="strip" data-method="{_esc(m)}"><h3>{_esc(c)} · {_esc(m)}: {len(p["differ"])} '
                         f'of {p["compared"]} verdicts differ</h3><div class="row">{"".join(tiles)}</div></div>')
    css_js_methods = list(diff["methods"])
    page = _page("anomaly_core review: A vs B", "".join(parts), css_js_methods)
    return page.replace("<script>", "<style>.v.fp,.v.fn{color:#c00020}.v.tp,.v.tn{color:#070}</style><script>", 1)
