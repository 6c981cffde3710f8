"""The report's HTML: one page, standard library only (``html.escape`` and f-strings).

Self-contained by construction: every image is a ``data:`` URI, the style
sheet is inline, links are in-page anchors or relative paths to sibling
reports, and there is no script at all (``<details>`` folds the long parts
without one). So the file opens offline, from a mail attachment or a CI
artifact, in any browser.
"""

from __future__ import annotations

import base64
import json
from html import escape
from typing import Any, Iterable, Sequence

from cnnreg.core.tables import format_value
from cnnreg.workflows.report_data import Example, RunReport

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 0 1.5em 3em; color: #1d2330; background: #fff; }
h1 { font-size: 1.6em; margin: 1em 0 .2em; } h2 { border-bottom: 1px solid #d7dce5; padding-bottom: .2em; margin-top: 2em; }
h3 { font-size: 1.05em; margin: 1.2em 0 .4em; }
.muted { color: #5c6576; } .note { background: #fff8e1; border-left: 4px solid #f0b400; padding: .5em .8em; }
nav a { margin-right: .9em; white-space: nowrap; }
table { border-collapse: collapse; margin: .5em 0; } th, td { padding: .25em .7em; border-bottom: 1px solid #e6e9ef;
       text-align: left; vertical-align: top; } th { background: #f3f5f9; } td.num { text-align: right;
       font-variant-numeric: tabular-nums; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: 12px; }
img.figure { max-width: 100%; height: auto; display: block; }
.gallery { display: flex; flex-wrap: wrap; gap: 12px; } .gallery figure { margin: 0; width: 150px; }
.gallery figure.wide { width: auto; } .gallery img { width: 128px; height: auto; image-rendering: pixelated;
       border: 1px solid #ccd; } .gallery figcaption { font-size: 12px; line-height: 1.3; }
.wrong { color: #b00020; } .right { color: #1b7f3b; }
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def img(png: bytes, alt: str, cls: str = "figure") -> str:
    return f'<img class="{cls}" src="{data_uri(png)}" alt="{escape(alt)}">'


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[bool] | None = None) -> str:
    numeric = numeric or [False] * len(headers)
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="num">{cell}</td>' if num else f"<td>{cell}</td>"
                                    for cell, num in zip(row, numeric)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def key_values(pairs: Iterable[tuple[str, Any]]) -> str:
    return table(("", ""), ((f"<b>{escape(k)}</b>", escape(str(v))) for k, v in pairs))


def page(title: str, nav: Sequence[tuple[str, str]], sections: Sequence[str]) -> str:
    links = " ".join(f'<a href="#{anchor}">{escape(label)}</a>' for anchor, label in nav)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{escape(title)}</title>"
            f"<style>{STYLE}</style></head><body>\n<h1>{escape(title)}</h1>\n<nav>{links}</nav>\n"
            + "\n".join(sections) + "\n</body></html>\n")


def section(anchor: str, heading: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{escape(heading)}</h2>\n{body}\n</section>'


def pct(value: float) -> str:
    return f"{value:.1%}"


# -- one run -----------------------------------------------------------------------------------


SECTIONS = (("summary", "Summary"), ("environment", "Environment"), ("curves", "Training curves"),
            ("confusion", "Confusion matrix"), ("per-class", "Per-class results"),
            ("confused", "Most confused pairs"), ("top-losses", "Highest-loss images"),
            ("grad-cam", "Grad-CAM"), ("calibration", "Calibration"))


def run_page(r: RunReport) -> str:
    recipe = r.info.get("recipe") or {}
    name = recipe.get("name") or r.summary.get("name") or r.run_dir.name
    bodies = {"summary": _summary(r, recipe), "environment": _environment(r.info), "curves": _curves(r),
              "confusion": _confusion(r), "per-class": _per_class(r), "confused": _confused(r),
              "top-losses": _top_losses(r), "grad-cam": _grad_cam(r), "calibration": _calibration(r)}
    sections = [f'<p class="muted">{escape(str(r.run_dir))} &middot; created {escape(str(r.info.get("created", "?")))}'
                f" &middot; cnnreg {escape(str((r.info.get('versions') or {}).get('cnnreg', '?')))}</p>"]
    sections += [section(anchor, heading, bodies[anchor]) for anchor, heading in SECTIONS]
    return page(f"Run report: {name}", SECTIONS, sections)


def _component(spec: Any) -> str:
    if not isinstance(spec, dict):
        return "none" if spec is None else str(spec)
    params = ", ".join(f"{k}={json.dumps(v)}" for k, v in spec.items() if k != "name" and v is not None)
    return f"{spec.get('name')}({params})"


def _summary(r: RunReport, recipe: dict[str, Any]) -> str:
    s = r.summary
    monitor = s.get("monitor")
    best = (s.get("best") or {}).get(monitor) if monitor else None
    outcome = [("stopped", s.get("stopped", "?")), ("epochs run", s.get("epochs_run", "?")),
               ("best epoch", f"{s.get('best_epoch')} ({monitor} {format_value(monitor, best)})"
                if best is not None else s.get("best_epoch", "?")),
               ("training time", f"{s.get('train_seconds', 0):.1f} s"),
               (f"{r.split} split", f"{r.images} images: accuracy {pct(r.accuracy)}, cross-entropy {r.loss:.4f}")]
    if r.tta_views > 1:
        outcome.append(("test-time augmentation", f"{r.tta_views} views per image, logits merged as the evaluation "
                                                  "merges them (Grad-CAM uses the plain image)"))
    transforms = recipe.get("transforms") or {}
    parts = [("description", recipe.get("description") or ""), ("seed", recipe.get("seed")),
             ("data", _component(recipe.get("data"))), ("model", _component(recipe.get("model"))),
             ("train transforms", ", ".join(_component(t) for t in transforms.get("train") or []) or "none"),
             ("eval transforms", ", ".join(_component(t) for t in transforms.get("eval") or []) or "none"),
             ("loss", _component(recipe.get("loss"))), ("optimizer", _component(recipe.get("optimizer"))),
             ("scheduler", _component(recipe.get("scheduler"))),
             ("callbacks", ", ".join(_component(c) for c in recipe.get("callbacks") or []) or "none"),
             ("trainer", ", ".join(f"{k}={json.dumps(v)}" for k, v in (recipe.get("trainer") or {}).items()))]
    note = f'<p class="note">{escape(r.split_note)}</p>' if r.split_note else ""
    full = escape(json.dumps(recipe, indent=2))
    return (note + "<h3>Outcome</h3>" + key_values(outcome) + "<h3>Recipe</h3>" + key_values(parts)
            + f"<details><summary>the resolved recipe (recipe.json)</summary><pre>{full}</pre></details>")


def _environment(info: dict[str, Any]) -> str:
    versions = info.get("versions") or {}
    data = info.get("data") or {}
    machine = [("device", f"{info.get('device', '?')} ({info.get('device_name', '?')})"),
               ("precision", info.get("precision", "?")), ("channels last", info.get("channels_last", "?")),
               ("processes", info.get("world_size", 1)),
               ("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v is not None))]
    splits = data.get("splits") or {}
    classes = data.get("classes") or []
    shown = ", ".join(classes[:20]) + (f", ... ({len(classes)} in all)" if len(classes) > 20 else "")
    stats = [("classes", f"{len(classes)}: {shown}"),
             ("image size", "x".join(map(str, data.get("image_size") or [])) + f" (fit: {data.get('fit', '?')})"),
             ("channels", data.get("channels", "?")), ("mean", data.get("mean")), ("std", data.get("std")),
             ("splits", ", ".join(f"{k} {v}" for k, v in splits.items())),
             ("skipped files", len(data.get("skipped_files") or []))]
    plugins = table(("plugin", "distribution"), ((escape(k), escape(str(v))) for k, v in (info.get("plugins") or {}).items()))
    broken = info.get("broken_plugins") or []
    defaults = info.get("defaults") or []
    chosen = (table(("key", "value", "why", "to choose otherwise"),
                    ((escape(str(d.get("key"))), escape(json.dumps(d.get("value"))), escape(str(d.get("reason"))),
                      escape(str(d.get("override")))) for d in defaults))
              if defaults else "<p>None: the recipe set everything the run needed.</p>")
    return ("<h3>Machine</h3>" + key_values(machine) + "<h3>Data</h3>" + key_values(stats)
            + "<h3>Defaults the run chose</h3>" + chosen
            + f"<details><summary>plugins ({len(info.get('plugins') or {})})</summary>{plugins}</details>"
            + (f"<p class=\"note\">Plugins that failed to load: {escape('; '.join(map(str, broken)))}</p>" if broken else ""))


def _curves(r: RunReport) -> str:
    if r.curves is None:
        return "<p>No epoch records: last.pt and metrics.jsonl are both absent or unreadable.</p>"
    return img(r.curves, "loss, accuracy and learning rate per epoch")


def _confusion(r: RunReport) -> str:
    if r.confusion_figure is None:
        return (f"<p>{len(r.classes)} classes: a {len(r.classes)}x{len(r.classes)} matrix would not be legible. "
                "The most confused pairs are listed below, and the per-class table is sorted by F1, worst first.</p>")
    return img(r.confusion_figure, f"confusion matrix on the {r.split} split, counts and normalised")


def _per_class(r: RunReport) -> str:
    rows = list(r.per_class)
    many = len(rows) > 20
    if many:
        rows.sort(key=lambda c: (c.f1, c.name))
    intro = f"<p>On the {escape(r.split)} split{', sorted by F1 (worst first)' if many else ''}.</p>"
    return intro + table(("class", "precision", "recall", "F1", "support"),
                         ((escape(c.name), f"{c.precision:.3f}", f"{c.recall:.3f}", f"{c.f1:.3f}", c.support)
                          for c in rows), numeric=(False, True, True, True, True))


def _confused(r: RunReport) -> str:
    if not r.confusions:
        return f"<p>No image of the {escape(r.split)} split was misclassified.</p>"
    return (f"<p>The {len(r.confusions)} largest off-diagonal cells of the confusion matrix.</p>"
            + table(("true class", "predicted as", "images", "share of the true class"),
                    ((escape(c.true), escape(c.predicted), c.count, pct(c.share)) for c in r.confusions),
                    numeric=(False, False, True, True)))


def _caption(e: Example) -> str:
    verdict = "right" if e.true == e.predicted else "wrong"
    return (f'<figcaption>true: <b>{escape(e.true)}</b><br>predicted: <span class="{verdict}">{escape(e.predicted)}'
            f"</span> ({pct(e.confidence)})<br>loss {e.loss:.3f} &middot; #{e.index}</figcaption>")


def _figure(e: Example, extra: str = "") -> str:
    alt = f"{e.true} predicted as {e.predicted}"
    return f'<figure>{img(e.image, alt, "tile")}{_caption(e)}</figure>{extra}'


def _top_losses(r: RunReport) -> str:
    if not r.top_losses:
        return "<p>No images.</p>"
    return (f"<p>The {len(r.top_losses)} images of the {escape(r.split)} split with the highest loss (the "
            "cross-entropy of their true class), as the model saw them before normalisation; confidence is "
            "the predicted class's.</p><div class=\"gallery\">"
            + "".join(_figure(e) for e in r.top_losses) + "</div>")


def _cam_row(e: Example) -> str:
    maps = "".join(f'<figure>{img(png, what, "tile")}<figcaption>{escape(what)}</figcaption></figure>'
                   for what, png in e.cams)
    return f'<div class="gallery">{_figure(e)}{maps}</div>'


def _grad_cam(r: RunReport) -> str:
    if not (r.cam_right or r.cam_wrong) or not any(e.cams for e in (*r.cam_right, *r.cam_wrong)):
        return f"<p>{escape(r.cam_note or 'No images to show.')}</p>"
    parts = [f"<p>Where the evidence for a class lies (red: most). {escape(r.cam_note)}</p>"]
    if r.cam_right:
        parts.append("<h3>Right, most confident</h3>" + "".join(_cam_row(e) for e in r.cam_right))
    parts.append("<h3>Wrong, most confident</h3>" + ("".join(_cam_row(e) for e in r.cam_wrong) if r.cam_wrong
                                                     else "<p>No image was misclassified.</p>"))
    return "".join(parts)


def _calibration(r: RunReport) -> str:
    c = r.calibration
    headers = ["measure", "as trained"] + ([f"T = {c.temperature:.3f}"] if c.temperature is not None else [])
    rows = [("ECE (15 bins)", c.ece, c.ece_after), ("classwise ECE", c.classwise_ece, c.classwise_ece_after),
            ("negative log-likelihood", c.nll, c.nll_after)]
    cells = [[escape(name), f"{before:.4f}"] + ([f"{after:.4f}"] if c.temperature is not None and after is not None else [])
             for name, before, after in rows]
    kind = "note" if c.source == "absent" else "muted"
    return (f'<p class="{kind}">{escape(c.note)}</p>'
            + f"<p>On the {escape(r.split)} split: how far the confidences can be trusted (0 is perfectly calibrated).</p>"
            + table(headers, cells, numeric=[False] + [True] * (len(headers) - 1))
            + (img(c.figure, "reliability diagram") if c.figure else ""))
