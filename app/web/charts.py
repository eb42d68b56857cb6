"""Small server-side SVG charts (no chart library, no JavaScript, no inline styles for the CSP).

Every bar has a <title>, so hovering shows its range and count in any browser.
"""

from __future__ import annotations

from markupsafe import Markup, escape


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 1000 or abs(x) < 0.01:
        return f"{x:.2g}"
    return f"{x:.3g}"


def histogram(counts: list[int], edges: list[float], *, width: int = 420, height: int = 120, label: str = "",
              css: str = "bars", log_counts: bool = False, x_format=_fmt, highlight: tuple[float, float] | None = None) -> Markup:
    """A bar chart of counts over bins [edges[i], edges[i+1])."""
    import math

    n = len(counts)
    if n == 0 or len(edges) != n + 1:
        return Markup('<p class="muted">no data</p>')
    pad_l, pad_b, pad_t = 34, 22, 6
    w, h = width - pad_l - 4, height - pad_b - pad_t
    vals = [math.log10(c + 1) if log_counts else c for c in counts]
    top = max(vals) or 1
    bw = w / n
    parts = [f'<svg class="chart {css}" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">']
    parts.append(f'<line class="axis" x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}"/>')
    for i, (c, v) in enumerate(zip(counts, vals)):
        bh = h * v / top
        x = pad_l + i * bw
        cls = "bar hl" if highlight and highlight[0] <= edges[i] < highlight[1] else "bar"
        parts.append(f'<rect class="{cls}" x="{x:.2f}" y="{pad_t + h - bh:.2f}" width="{max(bw - 0.6, 0.5):.2f}" '
                     f'height="{bh:.2f}"><title>{escape(x_format(edges[i]))} – {escape(x_format(edges[i + 1]))}: '
                     f'{c:,}</title></rect>')
    parts.append(f'<text class="tick" x="{pad_l}" y="{height - 6}">{escape(x_format(edges[0]))}</text>')
    parts.append(f'<text class="tick end" x="{pad_l + w}" y="{height - 6}">{escape(x_format(edges[-1]))}</text>')
    if label:
        parts.append(f'<text class="tick mid" x="{pad_l + w / 2}" y="{height - 6}">{escape(label)}</text>')
    peak = max(counts)
    parts.append(f'<text class="tick end" x="{pad_l - 4}" y="{pad_t + 9}">{peak:,}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def log_density_chart(hist: dict, *, width: int = 640, height: int = 150) -> Markup:
    counts = hist.get("counts", [])
    edges = hist.get("edges", [])
    return histogram(counts, edges, width=width, height=height, label="log10 feature density",
                     x_format=lambda x: f"{x:.0f}" if float(x).is_integer() else f"{x:.1f}")


def bar_list(values: list[float], labels: list[str], *, width: int = 280, positive: bool = True) -> Markup:
    """Horizontal bars for the logit tables."""
    if not values:
        return Markup("")
    top = max(abs(v) for v in values) or 1
    rows = []
    for v, lab in zip(values, labels):
        pct = 100 * abs(v) / top
        rows.append(f'<div class="lrow"><span class="ltok tok">{lab}</span><span class="lbar {"pos" if positive else "neg"}">'
                    f'<svg viewBox="0 0 100 8" preserveAspectRatio="none"><rect x="0" y="0" width="{pct:.1f}" height="8"/></svg>'
                    f'</span><span class="lval">{v:+.3f}</span></div>')
    return Markup("".join(rows))
