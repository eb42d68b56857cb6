"""Small server-side SVG charts (no chart library, no JavaScript, no inline styles for the CSP).

Every bar has a <title>, so hovering shows its range and count in any browser. Sizes are in the
viewBox; CSS scales the SVG to its container.
"""

from __future__ import annotations

import math

from markupsafe import Markup, escape


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 1000 or abs(x) < 0.01:
        return f"{x:.2g}"
    return f"{x:.3g}"


def _count(c: int) -> str:
    return f"{c / 1e6:.1f}M" if c >= 1e6 else f"{c / 1e3:.1f}k" if c >= 1e4 else f"{c:,}"


def histogram(counts: list[int], edges: list[float], *, width: int = 420, height: int = 120, label: str = "",
              css: str = "bars", log_counts: bool = False, x_format=_fmt, highlight: tuple[float, float] | None = None,
              signed: bool = False, ticks: list[float] | None = None) -> Markup:
    """A bar chart of counts over bins [edges[i], edges[i+1]).

    signed: bins below zero get the class `neg` (the logit histogram); ticks: x values to label
    (default: the two ends, plus 0 when it lies inside)."""
    n = len(counts)
    if n == 0 or len(edges) != n + 1 or not any(counts):
        return Markup('<p class="muted small nodata">no data</p>')
    pad_l, pad_r, pad_b, pad_t = 36, 6, 26, 8
    w, h = width - pad_l - pad_r, height - pad_b - pad_t
    vals = [math.log10(c + 1) if log_counts else c for c in counts]
    top = max(vals) or 1
    bw = w / n
    lo, hi = edges[0], edges[-1]
    span = (hi - lo) or 1.0

    def xpos(v: float) -> float:
        return pad_l + (v - lo) / span * w

    labels = [x_format(e) for e in edges]  # numbers as text: nothing to escape
    parts = [f'<svg class="chart {css}" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)} histogram">']
    for frac in (0.5, 1.0):
        y = pad_t + h - h * frac
        parts.append(f'<line class="grid" x1="{pad_l}" y1="{y:.1f}" x2="{pad_l + w}" y2="{y:.1f}"/>')
    for i, (c, v) in enumerate(zip(counts, vals)):
        if c <= 0:
            continue
        bh = max(h * v / top, 1.0)
        x = pad_l + i * bw
        cls = "bar"
        if highlight and highlight[0] <= edges[i] < highlight[1]:
            cls += " hl"
        if signed and edges[i + 1] <= 0:
            cls += " neg"
        parts.append(f'<rect class="{cls}" x="{x:.1f}" y="{pad_t + h - bh:.1f}" width="{max(bw - 0.8, 0.6):.1f}" '
                     f'height="{bh:.1f}"><title>{labels[i]} to {labels[i + 1]}: {c:,}</title></rect>')
    parts.append(f'<line class="axis" x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}"/>')
    if ticks is None:
        ticks = [lo, hi] + ([0.0] if lo < 0 < hi else [])
    for t in ticks:
        if not lo <= t <= hi:
            continue
        x = xpos(t)
        anchor = "start" if x - pad_l < 12 else "end" if pad_l + w - x < 12 else "middle"
        parts.append(f'<line class="tickmark" x1="{x:.1f}" y1="{pad_t + h}" x2="{x:.1f}" y2="{pad_t + h + 3}"/>')
        parts.append(f'<text class="tick {anchor}" x="{x:.1f}" y="{pad_t + h + 13}">{escape(x_format(t))}</text>')
    if label:
        parts.append(f'<text class="axislabel" x="{pad_l + w / 2:.1f}" y="{height - 2}">{escape(label)}</text>')
    peak = max(counts)
    parts.append(f'<text class="tick end" x="{pad_l - 4}" y="{pad_t + 4}">{_count(peak)}</text>')
    parts.append(f'<text class="tick end" x="{pad_l - 4}" y="{pad_t + h}">0</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def log_density_chart(hist: dict, *, width: int = 1200, height: int = 160) -> Markup:
    counts = hist.get("counts", [])
    edges = hist.get("edges", [])
    if not edges:
        return histogram([], [])
    lo, hi = edges[0], edges[-1]
    ticks = [float(t) for t in range(math.ceil(lo), math.floor(hi) + 1)]
    return histogram(counts, edges, width=width, height=height, label="log10 feature density (share of tokens)", css="bars wide",
                     x_format=lambda x: f"{x:.0f}" if float(x).is_integer() else f"{x:.2f}", ticks=ticks)


def bar_list(values: list[float], labels: list[str], *, positive: bool = True) -> Markup:
    """Horizontal bars for the logit tables: token, bar, value."""
    if not values:
        return Markup('<p class="muted small">none</p>')
    top = max(abs(v) for v in values) or 1
    rows = ['<div class="ltable">']
    for v, lab in zip(values, labels):
        pct = 100 * abs(v) / top
        rows.append(f'<div class="lrow"><span class="ltok tok">{lab}</span><span class="lbar {"pos" if positive else "neg"}">'
                    f'<svg viewBox="0 0 100 8" preserveAspectRatio="none" aria-hidden="true"><rect x="0" y="0" width="{pct:.1f}" height="8"/></svg>'
                    f'</span><span class="lval">{v:+.3f}</span></div>')
    rows.append("</div>")
    return Markup("".join(rows))


def density_bar(density: float | None, *, lo: float = -7.0) -> Markup:
    """A tiny bar for a table cell: log10 density from `lo` (empty) to 0 (full)."""
    if density is None or density <= 0:
        return Markup('<svg class="dbar" viewBox="0 0 60 6" aria-hidden="true"><rect class="track" width="60" height="6"/></svg>')
    frac = min(1.0, max(0.0, (math.log10(density) - lo) / -lo))
    cls = "fill dense" if density > 0.1 else "fill"
    return Markup(f'<svg class="dbar" viewBox="0 0 60 6" aria-hidden="true"><rect class="track" width="60" height="6"/>'
                  f'<rect class="{cls}" width="{60 * frac:.1f}" height="6"/></svg>')
