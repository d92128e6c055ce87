"""
How a run went, as a page a person opens: report.html with the curves of metrics.jsonl and the evaluation
table. No dependency: self-contained HTML with inline SVG.

    OUT/report.html     every training run: loss, cross-entropy, kept fraction, learning rate and gradient norm
                        over the steps, and the evaluation table when there is one
"""
import html
import json

import evaluate
from distributed import dist_info


def run_report(out, eval_rows=None):
    """OUT/report.html: the curves of OUT/metrics.jsonl, and the evaluation table (rank 0 writes it)."""
    if dist_info()[0] != 0:
        return
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    charts = "".join(chart(rows, key) for key in ("loss", "ce", "kept", "lr", "grad_norm"))
    table = ""
    if eval_rows:
        cols = sorted({c for _, r in eval_rows for c in r}, key=lambda c: (c != "ce", c))
        table = "<h2>evaluation</h2><table><tr><th>model</th>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"
        table += "".join(f"<tr><td>{html.escape(name)}</td>" + "".join(
            f"<td>{evaluate.fmt(r.get(c, ''), c)}</td>" for c in cols) + "</tr>" for name, r in eval_rows) + "</table>"
    (out / "report.html").write_text(PAGE.format(title=html.escape(f"{out}: {len(rows)} steps"), body=charts + table))


def chart(rows, key, w=560, h=150):
    """A line chart of rows[i][key] over the steps, as inline SVG, with the range written on its axis."""
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
    if not pts:
        return ""
    (x0, x1), (y0, y1) = [(min(v), max(v)) for v in zip(*pts)]
    sx = lambda x: 50 + (w - 60) * (x - x0) / ((x1 - x0) or 1)
    sy = lambda y: h - 20 - (h - 30) * (y - y0) / ((y1 - y0) or 1)
    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    return (f'<figure><figcaption>{key}</figcaption><svg width="{w}" height="{h}">'
            f'<polyline fill="none" stroke="#2a7" stroke-width="1.5" points="{line}"/>'
            f'<text x="0" y="12">{y1:.4g}</text><text x="0" y="{h - 20}">{y0:.4g}</text>'
            f'<text x="50" y="{h - 4}">step {x0}</text><text x="{w - 80}" y="{h - 4}">step {x1}</text></svg></figure>')


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body {{ font: 14px/1.5 system-ui, sans-serif; margin: 2em; max-width: 70em }}
.ex {{ font-family: monospace; white-space: pre-wrap; border-bottom: 1px solid #ddd; padding: .5em 0 }}
.prompt {{ color: #888 }} .n {{ color: #888; font-size: 80% }} figure {{ display: inline-block; margin: 1em }}
svg text {{ font-size: 10px; fill: #555 }} table {{ border-collapse: collapse }} td, th {{ border: 1px solid #ccc; padding: .2em .6em }}
</style></head><body><h1>{title}</h1>
{body}
</body></html>
"""
