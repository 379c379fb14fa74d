"""Loss and recall curves of a training run, as one self-contained SVG file (no plotting library needed).

    python -m qformer.plot runs/stage1          # reads runs/stage1/metrics.jsonl, writes runs/stage1/metrics.svg

`metrics.jsonl` holds one JSON record per line: training records ({"step", "epoch", "lr", "itc", "itm",
"itg", "loss", ...}) and evaluation records ({"kind": "eval", "step", "epoch", "itc": {"txt_r1", ...},
"itc+itm": {...}}); `read_metrics` splits them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

LOSS_KEYS = ("itc", "itm", "itg", "loss")  # training records (stage 2 logs "loss" only)
RECALL_ROWS = ("itc", "itc+itm")  # evaluation rows: ITC-only (dashed) and ITC+ITM re-ranked (solid)
RECALL_KEYS = ("txt_r1", "img_r1", "txt_r5", "img_r5")
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
MAX_POINTS = 2000  # per curve; longer runs are thinned evenly (the last point always kept)
W, H, PAD = 720, 300, 56  # one panel's size and margin, in px

Series = tuple[str, list[tuple[float, float]], str, bool]  # (name, [(step, value)], colour, dashed)


def read_metrics(path: str | Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training records, evaluation records) of a metrics.jsonl file, in file order."""
    records = [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
    return [r for r in records if r.get("kind") != "eval"], [r for r in records if r.get("kind") == "eval"]


def _curve(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The finite points, thinned evenly to at most about MAX_POINTS (the last one kept)."""
    points = [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]
    if len(points) <= MAX_POINTS:
        return points
    kept = points[:: math.ceil(len(points) / MAX_POINTS)]
    return kept if kept[-1] == points[-1] else [*kept, points[-1]]


def _panel(title: str, series: Sequence[Series], top: int) -> list[str]:
    """SVG elements of one line chart (axes, ticks, polylines, legend) whose box starts at y=top."""
    pts = [p for _, s, _, _ in series for p in s]
    x0, x1 = min(x for x, _ in pts), max(x for x, _ in pts)
    y0, y1 = min(y for _, y in pts), max(y for _, y in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    left, right, bottom = PAD, W - 150, top + H - PAD // 2

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (right - left)

    def sy(y: float) -> float:
        return bottom - (y - y0) / (y1 - y0) * (bottom - top - 24)

    out = [f'<text x="{left}" y="{top + 14}" font-weight="bold">{escape(title)}</text>',
           f'<rect x="{left}" y="{top + 24}" width="{right - left}" height="{bottom - top - 24}" '
           'fill="none" stroke="#999"/>']
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        out.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
        out.append(f'<line x1="{left}" x2="{right}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" stroke="#eee"/>')
    for x, anchor in ((x0, "start"), (x1, "end")):
        out.append(f'<text x="{sx(x):.1f}" y="{bottom + 16}" text-anchor="{anchor}">step {x:g}</text>')
    for n, (name, s, colour, dashed) in enumerate(series):
        dash = ' stroke-dasharray="5,3"' if dashed else ""
        if len(s) > 1:
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
            out.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.5"{dash}/>')
        if len(s) <= 50:  # sparse curves (one evaluation per epoch): mark every point
            out += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{colour}"/>' for x, y in s]
        ly = top + 36 + 16 * n
        out.append(f'<line x1="{right + 10}" x2="{right + 34}" y1="{ly - 4}" y2="{ly - 4}" stroke="{colour}" '
                   f'stroke-width="2"{dash}/><text x="{right + 40}" y="{ly}">{escape(name)}</text>')
    return out


def metrics_svg(train: Sequence[dict[str, Any]], evals: Sequence[dict[str, Any]] = ()) -> str:
    """An SVG document: training losses against step, then (when there are evaluation records) recall."""
    panels: list[tuple[str, list[Series]]] = []
    losses = [(k, _curve([(r["step"], r[k]) for r in train if k in r]), COLOURS[i], False)
              for i, k in enumerate(LOSS_KEYS)]
    panels.append(("training loss", [s for s in losses if s[1]]))
    recall = [(f"{row} {k}", _curve([(r["step"], r[row][k]) for r in evals if k in r.get(row, {})]), COLOURS[i],
               row == "itc") for row in RECALL_ROWS for i, k in enumerate(RECALL_KEYS)]
    split = next((r["split"] for r in evals if r.get("split")), "")
    panels.append((f"retrieval recall@K (%) on {split}" if split else "retrieval recall@K (%)",
                   [s for s in recall if s[1]]))
    panels = [p for p in panels if p[1]]
    body = [e for n, (title, series) in enumerate(panels) for e in _panel(title, series, n * H)]
    height = max(1, len(panels)) * H
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" '
            f'font-family="sans-serif" font-size="11">\n<rect width="{W}" height="{height}" fill="white"/>\n'
            + "\n".join(body) + "\n</svg>\n")


def write_metrics_svg(train: Sequence[dict[str, Any]], evals: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Write `metrics_svg` atomically (a viewer never sees half a file); returns the path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(metrics_svg(train, evals))
    os.replace(tmp, path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qformer.plot", description=__doc__.split("\n")[0])
    p.add_argument("run", help="a run directory (holding metrics.jsonl) or a metrics.jsonl file")
    p.add_argument("--out", default="", help="SVG file to write (default: metrics.svg beside metrics.jsonl)")
    args = p.parse_args(argv)
    src = Path(args.run) / "metrics.jsonl" if Path(args.run).is_dir() else Path(args.run)
    print(write_metrics_svg(*read_metrics(src), args.out or src.with_name("metrics.svg")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
