"""
The charts of the pages: inline SVG of a metric's curve for each run, with round ticks, a grid, a
moving mean over the noisy curves and each step's value on hover.
"""

import html
import math

CURVES = {
    "loss": "loss: the rule's weighted cross-entropy, nats per response token",
    "ce": "cross-entropy of the response tokens, unweighted (nats)",
    "kept": "kept fraction: response tokens with a weight above 0",
    "lr": "learning rate",
    "grad_norm": "gradient norm, before clipping at 1",
}
SMOOTHED = ("loss", "ce")  # noisy from step to step: a moving mean is drawn over the raw line
COLOURS = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#17becf",
    "#7f7f7f",
    "#bcbd22",
]


def values(rows, key):
    """[(step, value)] of the rows whose `key` is a finite number."""
    return [
        (r["step"], r[key])
        for r in rows
        if type(r.get(key)) in (int, float) and math.isfinite(r[key])
    ]


HOVER = "Hover over a chart for the value at each step."
W, H, LEFT, BOTTOM, TOP, RIGHT = 540, 230, 58, 36, 10, 14  # pixels: the plot is inside the margins


def chart(key, lines, raw):
    """A figure with the curve of `key` for each (label, colour, [(step, value)]): axes with round
    ticks, a grid, and on hover the value at each step. Loss and ce: the moving mean, over the raw
    line when `raw`."""
    lines = [(label, colour, pts) for label, colour, pts in lines if pts]
    if not lines:
        return ""
    xs = [x for *_, pts in lines for x, _ in pts]
    ys = [y for *_, pts in lines for _, y in pts]
    xt = ticks(min(xs), max(xs), integer=True)
    yt = (
        [0.0, 0.25, 0.5, 0.75, 1.0]
        if key == "kept"
        else ticks(0 if key == "lr" else min(ys), max(ys))
    )
    sx = lambda x: LEFT + (W - LEFT - RIGHT) * (x - xt[0]) / (xt[-1] - xt[0])
    sy = lambda y: H - BOTTOM - (H - BOTTOM - TOP) * (y - yt[0]) / (yt[-1] - yt[0])
    svg = "".join(
        f'<line class="grid" x1="{LEFT}" x2="{W - RIGHT}" y1="{sy(y):.1f}" y2="{sy(y):.1f}"/>'
        f'<text class="tick" x="{LEFT - 5}" y="{sy(y) + 3:.1f}" text-anchor="end">{y:.4g}</text>'
        for y in yt
    )
    svg += "".join(
        f'<line class="grid" x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{TOP}" y2="{H - BOTTOM}"/>'
        f'<text class="tick" x="{sx(x):.1f}" y="{H - BOTTOM + 14}" '
        f'text-anchor="middle">{x:g}</text>'
        for x in xt
    )
    svg += (
        f'<text class="axis" x="{(LEFT + W - RIGHT) / 2}" y="{H - 4}" '
        'text-anchor="middle">optimizer step</text>'
    )
    h, note = (
        half_width(max(len(pts) for *_, pts in lines)),
        "",
    )  # one window for every run of the chart
    for label, colour, pts in lines:
        if key in SMOOTHED and raw:
            svg += polyline(pts, sx, sy, colour, "raw", label)
        svg += polyline(
            moving_mean(pts, h) if key in SMOOTHED else pts, sx, sy, colour, "line", label
        )
    if key in SMOOTHED:
        note = f" ({'bold' if raw else 'drawn'}: the mean of each step and the {h} on either side)"
    svg += hover_bands(key, lines, sx, xt)
    return (
        f'<figure data-key="{key}"><figcaption>{esc(CURVES[key])}{note}</figcaption>'
        f'<svg width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img">{svg}</svg></figure>'
    )


def polyline(pts, sx, sy, colour, kind, label=""):
    points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    return f'<polyline class="{kind}" data-run="{esc(label)}" stroke="{colour}" points="{points}"/>'


def hover_bands(key, lines, sx, xt, most=1000):
    """A transparent band over each step (at most `most`, every n-th step beyond) whose title names
    its value in every run."""
    by_run = [(label, dict(pts)) for label, _, pts in lines]
    steps = sorted({x for _, v in by_run for x in v})
    stride = math.ceil(len(steps) / most)
    steps = steps[::stride]
    half = (sx(xt[0] + stride) - sx(xt[0])) / 2
    out = ""
    for x in steps:
        text = f"step {x}" + "".join(
            f"\n{label + ': ' if len(lines) > 1 else key + ' '}{v[x]:.5g}"
            for label, v in by_run
            if x in v
        )
        out += (
            f'<rect class="hover" x="{sx(x) - half:.1f}" y="{TOP}" width="{max(2 * half, 1):.1f}" '
            f'height="{H - BOTTOM - TOP}"><title>{esc(text)}</title></rect>'
        )
    return out


def ticks(lo, hi, integer=False, n=4):
    """About n + 1 round values (1, 2 or 5 times a power of ten apart) from at most lo to at least
    hi.
    """
    if hi - lo <= 1e-9 * max(abs(lo), abs(hi)):  # one value: a small range around it
        lo, hi = lo - (abs(lo) * 0.1 or 1), hi + (abs(hi) * 0.1 or 1)
    raw = (hi - lo) / n
    unit = 10 ** math.floor(math.log10(raw))
    step = next(m * unit for m in (1, 2, 5, 10) if m * unit >= raw * (1 - 1e-9))
    step = max(step, 1) if integer else step
    return [
        round(i * step, 12)
        for i in range(math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9) + 1)
    ]


def half_width(n):
    """The moving mean's reach on either side, for n steps: about 2.5% of the run."""
    return max(1, n // 40)


def moving_mean(pts, h):
    """Each point's value replaced by the mean of the values of the points within h of it on either
    side.
    """
    ys = [y for _, y in pts]
    return [
        (x, sum(ys[max(0, i - h) : i + h + 1]) / len(ys[max(0, i - h) : i + h + 1]))
        for i, (x, _) in enumerate(pts)
    ]


def esc(v):
    return html.escape("" if v is None else str(v))
