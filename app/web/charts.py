"""Small server-side SVG charts (no chart library, no JavaScript, no inline styles for the CSP).

Every bar has a <title>, so hovering shows its range and count in any browser. Sizes are in the
viewBox; CSS scales the SVG to its container.
"""

from __future__ import annotations

import itertools
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


N_COLOURS = 10


def series_class(i: int) -> str:
    """The colour class of the i-th series (s0..s9), with a dash pattern once the colours repeat."""
    cls = f"s{i % N_COLOURS}"
    dash = (i // N_COLOURS) % 3
    return f"{cls} d{dash}" if dash else cls


def _finite(v, log: bool) -> bool:
    if v is None or isinstance(v, bool):
        return False
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return math.isfinite(f) and (f > 0 if log else True)


def line_chart(series: dict[str, list[tuple[float, float | None]]], *, width: int = 560, height: int = 190,
               label: str = "", x_label: str = "step", y_format=_fmt, log_y: bool | None = False,
               css: str = "lines") -> Markup:
    """Line chart of one metric over steps: one line per series (an SAE of a sweep), in a colour
    class by the series' position so that every chart of a page shares one legend.

    Points whose value is None, NaN or infinite (or not positive on a log axis) are left out and
    break the line; a lone point is drawn as a dot. log_y=None picks a log axis when every value is
    positive and they span more than two decades (a loss that starts far above where it ends)."""
    clean: list[tuple[int, str, list[tuple[float, float] | None]]] = []
    values: list[float] = []
    if log_y is None:
        ys = [float(y) for pts in series.values() for _, y in pts if _finite(y, False)]
        log_y = bool(ys) and min(ys) > 0 and max(ys) / min(ys) > 100
    for i, (name, pts) in enumerate(series.items()):
        out: list[tuple[float, float] | None] = []
        for x, y in sorted(((x, y) for x, y in pts if _finite(x, False)), key=lambda p: float(p[0])):
            if _finite(y, log_y):
                v = math.log10(float(y)) if log_y else float(y)
                out.append((float(x), v))
                values.append(v)
            elif out and out[-1] is not None:
                out.append(None)  # a gap
        clean.append((i, name, out))
    xs = [p[0] for _, _, pts in clean for p in pts if p is not None]
    if not xs:
        return Markup(f'<p class="muted small nodata">{escape(label) + ": " if label else ""}no data yet</p>')
    pad_l, pad_r, pad_b, pad_t = 46, 10, 28, 10
    w, h = width - pad_l - pad_r, height - pad_b - pad_t
    x0, x1 = min(xs), max(xs)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    y0, y1 = min(values), max(values)
    spread = (0.5 if log_y else (abs(y0) * 0.1 or 1.0)) if y1 == y0 else (y1 - y0) * 0.04
    nonneg = not log_y and y0 >= 0  # a margin must not invent negative losses or fractions
    y0, y1 = (max(0.0, y0 - spread) if nonneg else y0 - spread), y1 + spread

    def px(x: float) -> float:
        return pad_l + (x - x0) / (x1 - x0) * w

    def py(y: float) -> float:
        return pad_t + h - (y - y0) / (y1 - y0) * h

    def shown(y: float) -> str:
        return y_format(10 ** y if log_y else y)

    parts = [(f'<svg class="chart {css}" viewBox="0 0 {width} {height}" role="img" '
              f'aria-label="{escape(label)} by {escape(x_label)}">')]
    for frac in (0.0, 0.5, 1.0):
        y = pad_t + h - h * frac
        parts.append(f'<line class="grid" x1="{pad_l}" y1="{y:.1f}" x2="{pad_l + w}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick end" x="{pad_l - 4}" y="{y + 3:.1f}">{escape(shown(y0 + (y1 - y0) * frac))}</text>')
    for i, name, pts in clean:
        cls = series_class(i)
        title = f"<title>{escape(name)}</title>"
        segments: list[list[tuple[float, float]]] = [[]]
        for p in pts:
            if p is None:
                segments.append([])
            else:
                segments[-1].append(p)
        d = []
        for seg in segments:
            if len(seg) >= 2:
                d.append("M" + " L".join(f"{px(x):.1f},{py(y):.1f}" for x, y in seg))
            elif len(seg) == 1:
                x, y = seg[0]
                parts.append(f'<circle class="dot {cls}" cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5">{title}</circle>')
        if d:
            parts.append(f'<path class="line {cls}" d="{" ".join(d)}">{title}</path>')
        last = next((p for p in reversed(pts) if p is not None), None)
        if last is not None:
            x, y = last
            parts.append(f'<circle class="last {cls}" cx="{px(x):.1f}" cy="{py(y):.1f}" r="3">'
                         f'<title>{escape(name)} · {escape(x_label)} {_count(int(x))}: {escape(shown(y))}</title></circle>')
    parts.append(f'<line class="axis" x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}"/>')
    lo, hi = min(xs), max(xs)
    ticks = [lo] if hi == lo else [lo, (lo + hi) / 2, hi]
    for t in ticks:
        x = px(t)
        anchor = "start" if x - pad_l < 12 else "end" if pad_l + w - x < 12 else "middle"
        parts.append(f'<line class="tickmark" x1="{x:.1f}" y1="{pad_t + h}" x2="{x:.1f}" y2="{pad_t + h + 3}"/>')
        parts.append(f'<text class="tick {anchor}" x="{x:.1f}" y="{pad_t + h + 13}">{_count(round(t))}</text>')
    caption = f"{label} by {x_label}" + (" (log scale)" if log_y else "")
    parts.append(f'<text class="axislabel" x="{pad_l + w / 2:.1f}" y="{height - 2}">{escape(caption)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def legend(names: list[str]) -> Markup:
    """The key to line_chart's series classes, shared by every chart of a page."""
    items = [f'<li><svg class="swatch" viewBox="0 0 22 6" aria-hidden="true"><line class="line {series_class(i)}" '
             f'x1="1" y1="3" x2="21" y2="3"/></svg>{escape(name)}</li>' for i, name in enumerate(names)]
    return Markup(f'<ul class="chartlegend">{"".join(items)}</ul>')


# --- feature lineage and dark matter ---------------------------------------------------------------

def value_bars(values: list[float | None], labels: list[str], *, width: int = 560, height: int = 150, label: str = "",
               y_format=_fmt, css: str = "bars", tick_every: int = 1, reference: float | None = None) -> Markup:
    """Bars of values (not counts) over labelled categories, e.g. FVU by context position; None is a
    gap. `reference` draws a dashed line (e.g. the overall FVU); every tick_every-th label is shown."""
    n = len(values)
    finite = [v for v in values if _finite(v, False)]
    if not n or not finite:
        return Markup('<p class="muted small nodata">no data</p>')
    pad_l, pad_r, pad_b, pad_t = 40, 6, 28, 8
    w, h = width - pad_l - pad_r, height - pad_b - pad_t
    top = max(max(finite), reference or 0) or 1.0
    bw = w / n
    parts = [f'<svg class="chart {css}" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">']
    for frac in (0.5, 1.0):
        y = pad_t + h - h * frac
        parts.append(f'<line class="grid" x1="{pad_l}" y1="{y:.1f}" x2="{pad_l + w}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick end" x="{pad_l - 4}" y="{y + 3:.1f}">{escape(y_format(top * frac))}</text>')
    for i, (v, lab) in enumerate(zip(values, labels)):
        if not _finite(v, False):
            continue
        bh = max(h * max(float(v), 0.0) / top, 0.8)
        x = pad_l + i * bw
        parts.append(f'<rect class="bar" x="{x:.1f}" y="{pad_t + h - bh:.1f}" width="{max(bw - 0.8, 0.6):.1f}" '
                     f'height="{bh:.1f}"><title>{escape(lab)}: {escape(y_format(float(v)))}</title></rect>')
        if i % max(tick_every, 1) == 0:
            parts.append(f'<text class="tick middle" x="{x + bw / 2:.1f}" y="{pad_t + h + 12}">{escape(lab)}</text>')
    if reference is not None and _finite(reference, False):
        y = pad_t + h - h * float(reference) / top
        parts.append(f'<line class="ref" x1="{pad_l}" y1="{y:.1f}" x2="{pad_l + w}" y2="{y:.1f}">'
                     f'<title>overall: {escape(y_format(float(reference)))}</title></line>')
    parts.append(f'<line class="axis" x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}"/>')
    if label:
        parts.append(f'<text class="axislabel" x="{pad_l + w / 2:.1f}" y="{height - 2}">{escape(label)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def category_lines(series: dict[str, list[float | None]], labels: list[str], *, width: int = 560, height: int = 190,
                   label: str = "", y_max: float | None = None, y_format=_fmt, diagonal: list[float] | None = None) -> Markup:
    """Lines over evenly spaced labelled categories (e.g. the loss-concentration curve over top-q%),
    one colour class per series as in line_chart; `diagonal` draws a dashed reference series (what
    an even spread would give)."""
    vals = [float(v) for pts in series.values() for v in pts if _finite(v, False)]
    if not labels or not vals:
        return Markup('<p class="muted small nodata">no data</p>')
    pad_l, pad_r, pad_b, pad_t = 40, 10, 28, 10
    w, h = width - pad_l - pad_r, height - pad_b - pad_t
    top = y_max if y_max is not None else max(vals) or 1.0
    n = len(labels)

    def px(i: int) -> float:
        return pad_l + (i / max(n - 1, 1)) * w

    def py(v: float) -> float:
        return pad_t + h - min(max(v, 0.0), top) / top * h

    parts = [f'<svg class="chart lines" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">']
    for frac in (0.0, 0.5, 1.0):
        y = pad_t + h - h * frac
        parts.append(f'<line class="grid" x1="{pad_l}" y1="{y:.1f}" x2="{pad_l + w}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick end" x="{pad_l - 4}" y="{y + 3:.1f}">{escape(y_format(top * frac))}</text>')
    if diagonal:
        pts = " L".join(f"{px(i):.1f},{py(v):.1f}" for i, v in enumerate(diagonal))
        parts.append(f'<path class="ref" d="M{pts}"><title>an even spread</title></path>')
    for k, (name, pts) in enumerate(series.items()):
        cls = series_class(k)
        good = [(i, float(v)) for i, v in enumerate(pts) if _finite(v, False)]
        if len(good) >= 2:
            d = "M" + " L".join(f"{px(i):.1f},{py(v):.1f}" for i, v in good)
            parts.append(f'<path class="line {cls}" d="{d}"><title>{escape(name)}</title></path>')
        for i, v in good:
            parts.append(f'<circle class="last {cls}" cx="{px(i):.1f}" cy="{py(v):.1f}" r="2.5">'
                         f'<title>{escape(name)} · {escape(labels[i])}: {escape(y_format(v))}</title></circle>')
    parts.append(f'<line class="axis" x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}"/>')
    for i, lab in enumerate(labels):
        parts.append(f'<text class="tick middle" x="{px(i):.1f}" y="{pad_t + h + 12}">{escape(lab)}</text>')
    if label:
        parts.append(f'<text class="axislabel" x="{pad_l + w / 2:.1f}" y="{height - 2}">{escape(label)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def share_bar(share: float | None, *, width: int = 80) -> Markup:
    """A small horizontal bar for a share in [0, 1] (the layer map's persistence)."""
    if share is None or not _finite(share, False):
        return Markup(f'<svg class="sbar" viewBox="0 0 {width} 8" aria-hidden="true"><rect class="track" width="{width}" height="8"/></svg>')
    frac = min(1.0, max(0.0, float(share)))
    return Markup(f'<svg class="sbar" viewBox="0 0 {width} 8" aria-hidden="true"><rect class="track" width="{width}" height="8"/>'
                  f'<rect class="fill" width="{width * frac:.1f}" height="8"/></svg>')


def _scale(xs: list[float], ys: list[float], width: int, height: int, pad: float):
    """A function mapping data (x, y) into the box, keeping the aspect ratio (maps and scatters are geometry)."""
    lo_x, hi_x, lo_y, hi_y = min(xs), max(xs), min(ys), max(ys)
    s = min((width - 2 * pad) / ((hi_x - lo_x) or 1.0), (height - 2 * pad) / ((hi_y - lo_y) or 1.0))
    ox = pad + ((width - 2 * pad) - (hi_x - lo_x) * s) / 2
    oy = pad + ((height - 2 * pad) - (hi_y - lo_y) * s) / 2
    return lambda x, y: (ox + (x - lo_x) * s, height - (oy + (y - lo_y) * s))


def map_thumbnail(clusters: list[dict], here: tuple[float, float] | None, *, href: str, width: int = 300,
                  height: int = 200, bounds: tuple[float, float, float, float] | None = None) -> Markup:
    """The map in miniature: each cluster a disc at its centroid (area ∝ its size, its label on hover),
    and `here` (a latent's place) marked. `bounds` (min x, min y, max x, max y of the whole map) gives
    every latent's thumbnail the same frame; without it the frame fits the clusters and `here`."""
    if not clusters:
        return Markup('<p class="muted small nodata">no map</p>')
    if bounds is not None:
        xs, ys = [bounds[0], bounds[2]], [bounds[1], bounds[3]]
    else:
        xs = [c["x"] for c in clusters] + ([here[0]] if here else [])
        ys = [c["y"] for c in clusters] + ([here[1]] if here else [])
    to = _scale(xs, ys, width, height, 14)
    top = max(c["size"] for c in clusters) or 1
    parts = [f'<a href="{escape(href)}"><svg class="chart minimap" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="map of the SAE\'s latents">']
    for c in clusters:
        x, y = to(c["x"], c["y"])
        r = 2 + 10 * math.sqrt(c["size"] / top)
        parts.append(f'<circle class="cl k{c["id"] % 10}" cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}">'
                     f'<title>{escape(c["label"])} ({c["size"]} latents)</title></circle>')
    if here:
        x, y = to(*here)
        parts.append(f'<circle class="here" cx="{x:.1f}" cy="{y:.1f}" r="5"><title>this latent</title></circle>')
    parts.append("</svg></a>")
    return Markup("".join(parts))


def scatter(xs: list[float], ys: list[float], classes: list[int], titles: list[str], *, width: int = 520,
            height: int = 520, label: str = "") -> Markup:
    """A 2-D scatter with equal axes; point i gets class k{classes[i]} (k0-k9, or kx for the rest) and
    titles[i] on hover."""
    if not xs:
        return Markup('<p class="muted small nodata">no data</p>')
    to = _scale(xs, ys, width, height, 12)
    parts = [f'<svg class="chart scatter" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">']
    cx, cy = to(0.0, 0.0)
    parts.append(f'<line class="axis" x1="0" y1="{cy:.1f}" x2="{width}" y2="{cy:.1f}"/>'
                 f'<line class="axis" x1="{cx:.1f}" y1="0" x2="{cx:.1f}" y2="{height}"/>')
    for x, y, k, t in zip(xs, ys, classes, titles):
        px, py = to(x, y)
        parts.append(f'<circle class="pt k{k if 0 <= k < 10 else "x"}" cx="{px:.1f}" cy="{py:.1f}" r="3">'
                     f'<title>{escape(t)}</title></circle>')
    parts.append("</svg>")
    return Markup("".join(parts))


# --- comparing SAEs -----------------------------------------------------------------------------

def pareto_chart(points: list[dict], *, x_label: str, y_label: str, lower_y_better: bool, width: int = 420,
                 height: int = 300, y_format=_fmt, x_format=_fmt) -> Markup:
    """One Pareto plot of SAEs: each point (x, y, href, title, series, front, hollow, yerr) a link to its
    SAE's page, in the colour class of its series (an architecture: legend() is the key), hollow when
    its numbers are the training run's rather than a report card's, with a bar for its 95% interval
    (yerr, the half-width) where there is one. The front is joined by a dashed step line: moving
    right along it costs L0 and buys y."""
    pts = [p for p in points if _finite(p.get("x"), False) and _finite(p.get("y"), False)]
    if not pts:
        return Markup(f'<p class="muted small nodata">{escape(y_label)}: no SAE has both numbers</p>')
    pad_l, pad_r, pad_b, pad_t = 46, 12, 30, 10
    w, h = width - pad_l - pad_r, height - pad_b - pad_t
    xs = [float(p["x"]) for p in pts]
    ys = [float(p["y"]) for p in pts]
    lows = [float(p["y"]) - float(p["yerr"]) for p in pts if _finite(p.get("yerr"), False)]
    highs = [float(p["y"]) + float(p["yerr"]) for p in pts if _finite(p.get("yerr"), False)]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys + lows), max(ys + highs)
    xm = (x1 - x0) * 0.06 or (abs(x0) * 0.1 or 1.0)
    ym = (y1 - y0) * 0.06 or (abs(y0) * 0.1 or 0.05)
    x0, x1, y0, y1 = x0 - xm, x1 + xm, y0 - ym, y1 + ym

    def px(x: float) -> float:
        return pad_l + (x - x0) / (x1 - x0) * w

    def py(y: float) -> float:
        return pad_t + h - (y - y0) / (y1 - y0) * h

    parts = [f'<svg class="chart pareto" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{escape(y_label)} against {escape(x_label)}">']
    for frac in (0.0, 0.5, 1.0):
        y = pad_t + h - h * frac
        parts.append(f'<line class="grid" x1="{pad_l}" y1="{y:.1f}" x2="{pad_l + w}" y2="{y:.1f}"/>')
        parts.append(f'<text class="tick end" x="{pad_l - 4}" y="{y + 3:.1f}">{escape(y_format(y0 + (y1 - y0) * frac))}</text>')
    parts.append(f'<line class="axis" x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}"/>')
    parts.append(f'<line class="axis" x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + h}"/>')
    for frac in (0.0, 0.5, 1.0):
        x = pad_l + w * frac
        anchor = "start" if frac == 0 else "end" if frac == 1 else "middle"
        parts.append(f'<text class="tick {anchor}" x="{x:.1f}" y="{pad_t + h + 13}">{escape(x_format(x0 + (x1 - x0) * frac))}</text>')
    front = sorted((p for p in pts if p.get("front")), key=lambda p: (float(p["x"]), float(p["y"])))
    if len(front) >= 2:
        d = [f"M{px(float(front[0]['x'])):.1f},{py(float(front[0]['y'])):.1f}"]
        for a, b in itertools.pairwise(front):  # a staircase: the best y reachable at each L0
            d.append(f"L{px(float(b['x'])):.1f},{py(float(a['y'])):.1f} L{px(float(b['x'])):.1f},{py(float(b['y'])):.1f}")
        parts.append(f'<path class="front" d="{" ".join(d)}"><title>Pareto front</title></path>')
    for p in pts:
        cx, cy = px(float(p["x"])), py(float(p["y"]))
        cls = series_class(int(p.get("series", 0)))
        title = escape(p.get("title", ""))
        parts.append(f'<a href="{escape(p["href"])}">')
        if _finite(p.get("yerr"), False):
            e = float(p["yerr"])
            parts.append(f'<line class="err {cls}" x1="{cx:.1f}" y1="{py(float(p["y"]) - e):.1f}" x2="{cx:.1f}" '
                         f'y2="{py(float(p["y"]) + e):.1f}"/>')
        kind = " hollow" if p.get("hollow") else ""
        kind += " onfront" if p.get("front") else ""
        parts.append(f'<circle class="last pt {cls}{kind}" cx="{cx:.1f}" cy="{cy:.1f}" r="4.5"><title>{title}</title></circle>')
        parts.append("</a>")
    better = "lower is better" if lower_y_better else "higher is better"
    parts.append(f'<text class="axislabel" x="{pad_l + w / 2:.1f}" y="{height - 2}">{escape(x_label)} (lower is sparser)</text>')
    parts.append(f'<text class="tick start" x="{pad_l + 4}" y="{pad_t + 9}">{escape(y_label)} ({better})</text>')
    parts.append("</svg>")
    return Markup("".join(parts))
