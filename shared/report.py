"""A self-contained HTML report (images inline as PNG data URIs), written by the demo and the evaluation run.

A report is a list of sections; a section holds paragraphs, tables and rows of captioned images. The file has no
external references, so it can be mailed or archived as one piece.
"""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from .imaging import encode_png

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.8em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}
.row{display:flex;flex-wrap:wrap;gap:.6em;margin:.6em 0}figure{margin:0;text-align:center;font-size:.8em}
figure img{display:block;height:220px;border:1px solid #ddd}.note{color:#555;font-size:.9em}
.bad{color:#b00;font-weight:bold}.good{color:#070}
"""


@dataclass
class Figure:
    """One captioned image: (H, W, 3) uint8 RGB, stored at most `max_side` px on its long side and shown `height` px
    high (a plot with text needs more than a photo's 220)."""

    pixels: np.ndarray
    caption: str
    max_side: int = 384
    height: int = 220


@dataclass
class Section:
    """A titled block of paragraphs, tables (header row + rows) and image rows, rendered in that order."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[tuple[Sequence[str], Sequence[Sequence[object]]]] = field(default_factory=list)
    image_rows: list[list[Figure]] = field(default_factory=list)


def json_default(value):
    """`json.dumps(default=...)` for result files: numpy scalars and arrays, and paths."""
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def _data_uri(fig: Figure) -> str:
    px = fig.pixels
    scale = fig.max_side / max(px.shape[:2])
    if scale < 1:
        px = cv2.resize(px, (int(px.shape[1] * scale), int(px.shape[0] * scale)), interpolation=cv2.INTER_AREA)
    return "data:image/png;base64," + base64.b64encode(encode_png(px, {"caption": fig.caption})).decode()


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return html.escape(str(value))


def render_html(title: str, sections: Sequence[Section], *, subtitle: str = "") -> str:
    """The whole report as an HTML string."""
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if subtitle:
        out.append(f"<p class='note'>{html.escape(subtitle)}</p>")
    for sec in sections:
        out.append(f"<h2>{html.escape(sec.title)}</h2>")
        out.extend(f"<p>{html.escape(p)}</p>" for p in sec.paragraphs)
        for header, rows in sec.tables:
            out.append("<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
            out.extend("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
            out.append("</table>")
        for figs in sec.image_rows:
            out.append("<div class='row'>")
            out.extend(f"<figure><img src='{_data_uri(f)}' alt='{html.escape(f.caption)}'"
                       + (f" style='height:{f.height}px'" if f.height != 220 else "") + ">"
                       f"<figcaption>{html.escape(f.caption)}</figcaption></figure>" for f in figs)
            out.append("</div>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(path: Path, title: str, sections: Sequence[Section], *, subtitle: str = "") -> Path:
    """Write the report to `path` (parents created) and return its absolute path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(title, sections, subtitle=subtitle), encoding="utf-8")
    return path.resolve()
