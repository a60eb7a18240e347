"""`glimr audit`, stage 3: review.html, one self-contained page for the people who confirm or reject classes.

No network and no external file: the images are embedded as data URIs (JPEG, downscaled to ``thumb`` pixels),
the inlier matches are SVG lines, and the script is inline, so the page works when opened from a file.

Each flagged class (ranked as in flagged.json) shows its best pairs: the eval image (cropped to its query box,
as it was verified) beside the training image, with the RANSAC inlier matches drawn as lines, and two buttons,
*confirm* (the class shows an eval landmark: remove it) and *reject*. Decisions are kept in the browser's
localStorage (per audit) and exported with *Export decisions.json* (a download); *Load decisions* reads such a
file back, so a review can be resumed on another day or machine. The file::

    {"audit": "<audit id>", "decisions": {"<landmark_id>": "confirm" | "reject", ...}}

feeds ``glimr audit apply AUDIT_DIR --decisions decisions.json --out train_clean.csv``.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

from glimr.audit.overlap import AuditSettings
from glimr.audit.verify import match_lines

__all__ = ["render_review", "thumbnail_uri"]


def thumbnail_uri(path, box, size: int) -> tuple[str, int, int]:
    """(data URI of a JPEG thumbnail, width, height) of ``path`` cropped to ``box``, longest side <= ``size``."""
    from PIL import Image

    from glimr.extract.multiscale import crop_box
    from glimr.io.images import load_image

    img = load_image(path, target_size=None)
    if box is not None:
        img = crop_box(img, tuple(box), str(path))
    img.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), img.width, img.height


def _pair_svg(a, b, lines: dict, gap: int = 12) -> str:
    (ua, wa, ha), (ub, wb, hb) = a, b
    w, h = wa + gap + wb, max(ha, hb)
    segs = "".join(
        f'<line x1="{pa[0] * wa:.1f}" y1="{pa[1] * ha:.1f}" x2="{wa + gap + pb[0] * wb:.1f}" y2="{pb[1] * hb:.1f}"/>'
        for pa, pb in zip(lines["a"], lines["b"]))
    return (f'<svg class="pair" width="{w}" height="{h}" viewBox="0 0 {w} {h}" xmlns="http://www.w3.org/2000/svg">'
            f'<image href="{ua}" x="0" y="0" width="{wa}" height="{ha}"/>'
            f'<image href="{ub}" x="{wa + gap}" y="0" width="{wb}" height="{hb}"/>'
            f'<g class="matches">{segs}</g></svg>')


def render_review(out: Path, audit_id: str, flagged: list[dict], eval_images: dict, train, settings: AuditSettings,
                  *, feature_dir: Path | None = None, train_cache: Path | None = None, train_hashes=None,
                  summary: str = "", progress: bool = True) -> Path:
    """Write ``out`` (review.html). ``eval_images``: (set, name) -> EvalImage; ``train``: the GLDv2Set;
    ``train_hashes``: training image index -> content hash (the feature cache's key), optional."""
    from tqdm.auto import tqdm

    from glimr.io.atomic import atomic_write_bytes

    idx_of = {tid: i for i, tid in enumerate(train.ids)}
    thumbs: dict[tuple, tuple] = {}

    def thumb(path, box):
        key = (str(path), tuple(box) if box else None)
        if key not in thumbs:
            try:
                thumbs[key] = thumbnail_uri(path, box, settings.thumb)
            except ValueError:   # unreadable since it was verified: a grey placeholder
                thumbs[key] = ("data:image/gif;base64,R0lGODlhAQABAIAAAMzMzAAAACwAAAAAAQABAAACAkQBADs=",
                               settings.thumb, settings.thumb * 3 // 4)
        return thumbs[key]

    sections = []
    for c in tqdm(flagged, desc="review page", unit="class", disable=not progress, dynamic_ncols=True):
        pairs_html = []
        for p in c["best_pairs"]:
            ev = eval_images[(p["eval_set"], p["eval_image"])]
            t = idx_of[p["train_id"]]
            lines = match_lines(ev.path, ev.box, train.paths[t], settings, feature_dir=feature_dir,
                                train_cache=train_cache, train_hash=(train_hashes or {}).get(t))
            svg = _pair_svg(thumb(ev.path, ev.box), thumb(train.paths[t], None), lines)
            cap = (f'{html.escape(p["eval_set"])}: {html.escape(p["eval_image"])} &harr; training image '
                   f'{html.escape(p["train_id"])} &middot; {p["inliers"]} inliers &middot; global '
                   f'{p["global_score"]:.3f}')
            pairs_html.append(f'<figure>{svg}<figcaption>{cap}</figcaption></figure>')
        lm = html.escape(c["landmark_id"])
        n_train = c.get("train_images")
        sections.append(
            f'<section class="class" data-landmark="{lm}" id="lm-{lm}">'
            f'<h2>#{c["rank"]} landmark {lm} <span class="state"></span></h2>'
            f'<p class="facts">{c["eval_images"]} eval image(s) with a verified pair, {c["verified_pairs"]} verified '
            f'pair(s), best {c["max_inliers"]} inliers; evidence {c["evidence"]}'
            + (f'; {n_train} training images in this class' if n_train is not None else "") + '</p>'
            f'<p><button class="confirm" data-landmark="{lm}">confirm: it shows an eval landmark (remove)</button> '
            f'<button class="reject" data-landmark="{lm}">reject: different object (keep)</button></p>'
            + "".join(pairs_html) + '</section>')
    page = _PAGE.replace("__AUDIT__", json.dumps(audit_id)).replace("__N__", str(len(flagged))) \
        .replace("__SUMMARY__", html.escape(summary)).replace("__SECTIONS__", "\n".join(sections) or
                                                              '<p class="none">No class was flagged.</p>')
    atomic_write_bytes(out, page.encode("utf-8"))
    return out


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>glimr audit: review flagged training classes</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;max-width:1400px;color:#222}
header{position:sticky;top:0;background:#fff;border-bottom:1px solid #ccc;padding:.5em 0;z-index:1}
section.class{border:1px solid #ddd;border-radius:6px;margin:1em 0;padding:.5em 1em}
section.confirmed{border-color:#c00;background:#fff4f4} section.rejected{border-color:#090;background:#f4fff4}
figure{display:inline-block;margin:.3em .6em .3em 0;vertical-align:top} figcaption{font-size:12px;color:#555}
svg.pair line{stroke:#0f0;stroke-width:1;stroke-opacity:.8}
button{font:inherit;padding:.2em .7em;cursor:pointer} .state{font-size:14px;font-weight:normal;color:#555}
pre{white-space:pre-wrap;color:#444}
</style></head>
<body>
<header>
<h1 style="margin:.2em 0">glimr audit: <span id="count">__N__</span> flagged training classes</h1>
<p>Confirm a class when its training images show the same landmark or object as the eval image; reject it
otherwise. Decisions are saved in this browser and exported as decisions.json for
<code>glimr audit apply AUDIT_DIR --decisions decisions.json --out train_clean.csv</code>.</p>
<p><button id="export">Export decisions.json</button>
<label>Load decisions: <input type="file" id="load" accept=".json,application/json"></label>
<span id="progress"></span></p>
</header>
<pre id="summary">__SUMMARY__</pre>
<main>
__SECTIONS__
</main>
<script>
"use strict";
const AUDIT = __AUDIT__;
const KEY = "glimr-audit-decisions-" + AUDIT;
let decisions = {};
try { decisions = JSON.parse(localStorage.getItem(KEY) || "{}") || {}; } catch (e) { decisions = {}; }
function save() { try { localStorage.setItem(KEY, JSON.stringify(decisions)); } catch (e) {} }
function render() {
  const all = document.querySelectorAll("section.class");
  let done = 0;
  all.forEach(s => {
    const d = decisions[s.dataset.landmark];
    s.classList.toggle("confirmed", d === "confirm");
    s.classList.toggle("rejected", d === "reject");
    s.querySelector(".state").textContent = d === "confirm" ? "(confirmed: will be removed)" :
                                            d === "reject" ? "(rejected: kept)" : "(undecided)";
    if (d) done++;
  });
  document.getElementById("progress").textContent = done + " of " + all.length + " decided";
}
function decide(lm, d) { decisions[lm] = d; save(); render(); }
document.querySelectorAll("button.confirm").forEach(b => b.addEventListener("click", () => decide(b.dataset.landmark, "confirm")));
document.querySelectorAll("button.reject").forEach(b => b.addEventListener("click", () => decide(b.dataset.landmark, "reject")));
document.getElementById("export").addEventListener("click", () => {
  const blob = new Blob([JSON.stringify({audit: AUDIT, decisions: decisions}, null, 2) + "\\n"],
                        {type: "application/json"});
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = "decisions.json";
  document.body.appendChild(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
});
document.getElementById("load").addEventListener("change", ev => {
  const f = ev.target.files[0];
  if (!f) return;
  f.text().then(t => {
    const d = JSON.parse(t);
    if (d.audit && d.audit !== AUDIT && !confirm("This decisions file is from another audit (" + d.audit + "). Load it anyway?")) return;
    Object.assign(decisions, d.decisions || {});
    save(); render();
  }).catch(e => alert("cannot read " + f.name + ": " + e));
});
render();
</script>
</body></html>
"""
