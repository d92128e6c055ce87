"""
How runs went, as pages a person opens from disk: self-contained HTML with inline SVG, no script, no
network.

    OUT/report.html     every training run. At the top what ran (the arguments that matter,
                        checkpoint and data, counts of examples and response tokens, precision,
                        ranks), how it went
                        (steps, skipped steps, training time, tokens/s, kept fraction) and the
                        evaluation before and after; then the curves of metrics.jsonl with every
                        step's value on hover
    OUT/run.json        what that page needs beyond args.json and metrics.jsonl: the counts, the
                        ranks, the training time and the evaluation rows

Several runs side by side: the same curves overlaid, one colour per run, and a table with a row per
run.

    python -m infra.report runs/sft-1 runs/mass-1 runs/dft-1 --out compare.html

The charts of the pages: inline SVG of a metric's curve for each run, with round ticks, a grid, a
moving mean over the noisy curves and each step's value on hover.
"""

import html
import math
import os
import sys
from pathlib import Path

from infra import files
from infra.argtypes import Parser
from infra.rundir import NotARun, load_run, read_metrics

# marks a page this file wrote, which it may write again
GENERATOR = '<meta name="generator" content="prift">'


# --------------------------------------------------------------------------------------------------
# At the end of training


def run_report(out, eval_rows, seqs, state):
    """At the end of training (rank 0): OUT/run.json, then OUT/report.html from the files of OUT.
    eval_rows: (name, scores) as evaluate.table gives them, "base FILE" before training and "RULE
    FILE" after (or None); seqs: the (ids, n_prompt) trained on; state: train()'s, with train_s (its
    seconds) and from_step (the step a resumed run began at)."""
    # here, not above: report.py's command line reads files only, and starts without torch
    import data
    from infra.distributed import dist_info

    rank, world = dist_info()
    if rank != 0:
        return
    timed = [
        r for r in read_metrics(out) if r["step"] > state["from_step"]
    ]  # the steps train_s measured
    evaluation = {}
    for name, scores in eval_rows or []:
        model, _, file = name.partition(" ")
        evaluation.setdefault(file, {})["before" if model == "base" else "after"] = scores
    run = dict(
        examples=len(seqs),
        response_tokens=sum(map(data.n_response_tokens, seqs)),
        world_size=world,
        train_s=state["train_s"],
        timed_steps=len(timed),
        timed_tokens=sum(r.get("tokens", 0) for r in timed),
        evaluation=evaluation,
    )
    files.write_json(out / "run.json", run, "run summary")
    files.write_text(out / "report.html", run_page(load_run(out)), "report")
    from infra import logs  # here, as data above: report.py's command line starts without torch

    # --log: the evaluation (after at the last step), then closed
    logs.finish(out, evaluation, state.get("step", 0))


# --------------------------------------------------------------------------------------------------
# One run: report.html


def run_page(run):
    """The page of one run: the summary, the evaluation and the curves."""
    a, rows, r = run["args"], run["rows"], run["run"]
    top = (
        section("What ran", definitions(what_ran(a, r)), "what-ran")
        + section("How it went", definitions(how_it_went(rows, r)), "how-it-went")
        + (
            section("Evaluation", evaluation_table(r["evaluation"]), "evaluation")
            if r.get("evaluation")
            else ""
        )
    )
    link = (
        '<p><a href="weights.html">weights.html</a>: which tokens the rule keeps, before '
        "training</p>"
        if (run["dir"] / "weights.html").exists()
        else ""
    )
    curves = "".join(
        chart(key, [(a["rule"], COLOURS[0], values(rows, key))], raw=True) for key in CURVES
    )
    title = f"{a['rule']} on {name_of(a.get('data')) or 'the demo'}: {rows[-1]['step']} steps"
    return PAGE.format(
        title=esc(title),
        body=f'<p class="n">{esc(run["dir"])}</p><div class="top">{top}</div>{link}'
        f'<h2>Curves</h2><p class="n">{HOVER}</p>{curves}<p class="n">{esc(READING)}</p>',
    )


def what_ran(a, r):
    """(label, value) of the arguments that decide what a run is, with the counts of its data."""
    steps = (
        f"at most {a['max_steps']} steps"
        if a.get("max_steps")
        else f"{a.get('epochs', '?')} epoch(s)"
    )
    evals = a.get("eval_data") or []
    # one file, in runs from before lists
    evals = ", ".join(map(str, evals if isinstance(evals, list) else [evals]))
    micro = f"{a['micro_tokens']} positions" if a.get("micro_tokens") else a.get("micro_batch")
    return [
        ("rule", a.get("rule")),
        ("signal", a.get("signal") or "none"),
        ("threshold", short(a.get("threshold"))),
        ("model", a.get("model")),
        ("LoRA", lora_text(a)),
        ("reference", a.get("ref") if a.get("signal") == "prior" else "not used"),
        ("data", a.get("data") or "the demo's"),
        ("evaluated on", evals),
        ("template", a.get("template")),
        ("examples", r.get("examples")),
        ("response tokens", r.get("response_tokens")),
        ("batch", a.get("batch_size") and f"{a['batch_size']} sequences, micro-batch {micro}"),
        ("learning rate", short(a.get("lr"))),
        ("training length", steps),
        ("seed", a.get("seed")),
        ("precision", a.get("precision")),
        ("ranks", r.get("world_size")),
    ]


def lora_text(a):
    """--lora R's rank, scale and layers, or full fine-tuning."""
    if not a.get("lora"):
        return "off: full fine-tuning"
    alpha = a.get("lora_alpha") or 2 * a["lora"]
    return f"rank {a['lora']}, alpha {short(alpha)}, on {a.get('lora_targets')}"


def how_it_went(rows, r):
    """(label, value) of what the steps did, from metrics.jsonl and run.json."""
    kept = [v for _, v in values(rows, "kept")]
    train_s, steps = r.get("train_s"), r.get("timed_steps")
    resumed = steps is not None and steps < len(rows)
    return [
        (
            "steps",
            f"{rows[-1]['step']}" + (f" (the last {steps} after a resume)" if resumed else ""),
        ),
        ("skipped steps", rows[-1].get("skipped", 0)),
        (
            "training time",
            train_s and duration(train_s) + (" (since the resume)" if resumed else ""),
        ),
        ("response tokens / s", train_s and f"{r['timed_tokens'] / train_s:,.0f}"),
        ("mean kept", kept and f"{sum(kept) / len(kept):.1f}%"),
        ("final loss", number(rows[-1].get("loss"))),
        ("final training ce", number(rows[-1].get("ce"))),
        ("of what it learns", number(rows[-1].get("ce_learned"))),
        ("of what it sets aside", number(rows[-1].get("ce_set_aside"))),
    ]


# held-out cross-entropy; the demo's share of wrong answers given back
LOWER_IS_BETTER = (
    "ce",
    "wrong copied",
)


def evaluation_table(evaluation):
    """Before and after training, per evaluation file and measure, with the change."""
    body = ""
    for file, ba in evaluation.items():
        b, a = ba.get("before", {}), ba.get("after", {})
        for col in columns([b, a]):
            change = (
                a[col] - b[col] if all(type(d.get(col)) in (int, float) for d in (b, a)) else None
            )
            better = change is not None and change != 0 and (change < 0) == (col in LOWER_IS_BETTER)
            shown = "" if change is None else f"{change:+.3f}" if col == "ce" else f"{change:+.1f}"
            colour = "up" if better else "down" if change else ""
            body += (
                f"<tr><td>{esc(file)}</td><td>{esc(col)}</td><td>{cell(b.get(col), col)}</td>"
                f'<td>{cell(a.get(col), col)}</td><td class="{colour}">{shown}</td></tr>'
            )
    return (
        "<table><tr><th>file</th><th>measure</th><th>before</th><th>after</th><th>change</th></tr>"
        f'{body}</table><p class="n">%, except ce: the cross-entropy of the files\' reference '
        "solutions (held out, nats per token)</p>"
    )


# --------------------------------------------------------------------------------------------------
# Several runs: one page


def compare(dirs, page):
    """Write `page`: the runs in `dirs` side by side; NotARun for a directory that is not a run."""
    runs = [load_run(d) for d in dirs]
    page = Path(page)
    files.make_dir(page.parent)
    files.write_text(page, compare_page(runs, page.parent), "page")


def compare_page(runs, where):
    """Every run's curves overlaid, one colour each, and a table of a row per run. where: the page's
    directory, from which the links to each run's report.html are relative."""
    rules = [run["args"]["rule"] for run in runs]
    labels = [
        str(rule) if rules.count(rule) == 1 else f"{rule} ({run['dir'].name})"
        for rule, run in zip(rules, runs)
    ]
    colours = [COLOURS[i % len(COLOURS)] for i in range(len(runs))]
    legend = "".join(
        f'<span class="key"><i style="background:{c}"></i>{esc(label)}</span>'
        for label, c in zip(labels, colours)
    )
    curves = "".join(
        chart(
            key,
            [(label, c, values(run["rows"], key)) for label, c, run in zip(labels, colours, runs)],
            raw=False,
        )
        for key in CURVES
    )
    return PAGE.format(
        title=esc(f"{len(runs)} runs side by side"),
        body=compare_table(runs, labels, colours, where)
        + f'<h2>Curves</h2><p class="legend">{legend}</p><p class="n">{HOVER} Each run\'s own page '
        f"has the raw loss and ce under their moving mean.</p>{curves}"
        f'<p class="n">{esc(READING)}</p>',
    )


def compare_table(runs, labels, colours, where):
    """A row per run: its key arguments, its last loss and ce, its kept fraction, and each
    evaluation measure as before → after."""
    evals = {}  # (file, measure) -> None, in order of first appearance
    for run in runs:
        for file, ba in run["run"].get("evaluation", {}).items():
            evals.update({(file, col): None for col in columns(ba.values())})
    settings = {
        "signal": lambda a: short(a.get("signal")) or "none",
        "threshold": lambda a: short(a.get("threshold")),
        "model": lambda a: name_of(a.get("model")),
        "data": lambda a: name_of(a.get("data")) or "the demo's",
        "lr": lambda a: short(a.get("lr")),
        "batch": lambda a: short(a.get("batch_size")),
    }
    shown = {k: [get(run["args"]) for run in runs] for k, get in settings.items()}
    same = {
        k: v[0] for k, v in shown.items() if len(runs) > 1 and len(set(v)) == 1
    }  # said once, above the table
    head = [
        "run",
        "rule",
        *[k for k in shown if k not in same],
        "steps",
        "final loss",
        "final training ce",
        "kept %",
        *[f"{file} {col}".strip() for file, col in evals],
    ]
    out = ""
    for i, (run, label, colour) in enumerate(zip(runs, labels, colours)):
        rows, ev = run["rows"], run["run"].get("evaluation", {})
        kept = [v for _, v in values(rows, "kept")]
        page = run["dir"] / "report.html"
        name = esc(run["dir"].name)
        if page.exists():
            # "./": a directory named like a scheme ("javascript:...") stays a relative link
            link = "./" + Path(os.path.relpath(page, where)).as_posix()
            name = f'<a href="{esc(link)}">{name}</a>'
        cells = [
            f'<i class="swatch" style="background:{colour}"></i>{name}',
            esc(label),
            *[esc(v[i]) for k, v in shown.items() if k not in same],
            rows[-1]["step"],
            number(rows[-1].get("loss")),
            number(rows[-1].get("ce")),
            kept and f"{sum(kept) / len(kept):.1f}",
        ]
        for file, col in evals:
            b, after = (ev.get(file, {}).get(k, {}).get(col) for k in ("before", "after"))
            cells.append(
                f"{cell(b, col)} → {cell(after, col)}" if b is not None else cell(after, col)
            )
        out += "<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
    common = "".join(f"<dt>{k}</dt><dd>{esc(v)}</dd>" for k, v in same.items())
    head = "".join(f"<th>{esc(h)}</th>" for h in head)
    return (
        (f'<div>Every run: <dl class="inline">{common}</dl></div>' if common else "")
        + f'<div class="wide"><table class="runs"><tr>{head}</tr>{out}</table></div>'
        '<p class="n">final: the last step. Evaluation: before → after training, % except '
        "ce, the cross-entropy of the files' reference solutions (held out, nats).</p>"
    )


# --------------------------------------------------------------------------------------------------
# Small pieces of text


def name_of(path):
    """The last part of a path, e.g. a checkpoint's or a data file's name."""
    return Path(str(path)).name if path else ""


def number(v):
    return f"{v:.4f}" if type(v) in (int, float) else ""


def short(v):
    """An argument's value; a float to 4 significant digits."""
    return f"{v:.4g}" if type(v) is float else "" if v is None else str(v)


def cell(v, col):
    """An evaluation value: cross-entropy to 0.001, percentages to 0.1."""
    return "" if type(v) not in (int, float) else f"{v:.3f}" if col == "ce" else f"{v:.1f}"


def columns(score_dicts):
    """The measures in some score dicts, Avg@k and Pass@k first and ce last."""
    cols = {c for d in score_dicts for c, v in d.items() if type(v) in (int, float)}
    return sorted(cols, key=lambda c: (not c.startswith(("avg@", "pass@")), c == "ce", c))


def duration(s):
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min" if s < 7200 else f"{s / 3600:.1f} h"


def definitions(items):
    """A list of label: value, a dash where the value is not known."""
    return (
        "<dl>"
        + "".join(
            f"<dt>{esc(k)}</dt><dd>{esc(v) if v not in (None, '') else '—'}</dd>" for k, v in items
        )
        + "</dl>"
    )


def section(title, body, id):
    return f'<section id="{id}"><h2>{title}</h2>{body}</section>'


PAGE = (
    """<!doctype html><html><head><meta charset="utf-8">"""
    + GENERATOR
    + """<title>{title}</title><style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 1.5em 2em; max-width: 84em; color: #222 }}
h1 {{ font-size: 1.5em; margin: 0 }} h2 {{ font-size: 1.1em; margin: .2em 0 .4em }}
.top {{ display: flex; flex-wrap: wrap; gap: 1em; margin: 1em 0 }}
.top section {{ border: 1px solid #ddd; border-radius: 6px; padding: .6em 1em; flex: 1 1 20em }}
dl {{ display: grid; grid-template-columns: max-content auto; gap: .1em 1em; margin: 0 }} dt {{
color: #666 }} dd {{ margin: 0; overflow-wrap: anywhere }} .up {{ color: #1a7f37 }} .down {{ color:
#c62828 }} dl.inline, dl.inline dt, dl.inline dd {{ display: inline; margin-right: .4em }} dl.inline
dd {{ margin-right: 1.2em }} .ex {{ font-family: monospace; white-space: pre-wrap; border-bottom:
1px solid #ddd; padding: .5em 0 }} .prompt {{ color: #888 }} .n {{ color: #777; font-size: 85% }}
figcaption {{ font-size: 90% }} figure {{ display: inline-block; width: 540px; margin: .5em 1.5em
.5em 0; vertical-align: top }} table {{ border-collapse: collapse; margin: .3em 0 }} td, th {{
border: 1px solid #ccc; padding: .15em .5em; text-align: left }} td {{ font-variant-numeric:
tabular-nums }} .wide {{ overflow-x: auto }} .runs td {{ white-space: nowrap }} .key {{
margin-right: 1.2em; white-space: nowrap }} .key i, .swatch {{ display: inline-block; width: 1.6em;
height: 4px; vertical-align: middle; margin-right: .4em }} svg text {{ font-size: 10px; fill: #555
}} svg .axis {{ fill: #333 }} .grid {{ stroke: #eee }} polyline {{ fill: none; stroke-width: 1.8 }}
polyline.raw {{ stroke-width: 1; opacity: .35 }} rect.hover {{ fill: #000; fill-opacity: 0 }}
rect.hover:hover {{ fill-opacity: .07 }} </style></head><body><h1>{title}</h1> {body} </body></html>
"""
)


def main(argv=None):
    parser = Parser(
        prog="report.py",
        description="Several prift runs on one page: the curves overlaid, a table.",
    )
    parser.add_argument(
        "runs",
        nargs="+",
        type=Path,
        metavar="RUN",
        help="run directories (each an --out of prift.py)",
    )
    parser.add_argument(
        "--out", type=Path, required=True, help="the page to write, e.g. compare.html"
    )
    args = parser.parse_args(argv)
    read = [
        (f"run's {n}", d / n) for d in args.runs for n in ("metrics.jsonl", "args.json", "run.json")
    ]
    if found := files.overlap(args.out, read):  # a page written over a file of a run it reads
        parser.error(files.overlap_message("--out", args.out, found))
    if os.path.lexists(args.out) and not is_our_page(args.out):
        parser.error(
            f"--out {args.out} exists and is not a page report.py wrote; give another path"
        )
    try:
        compare(args.runs, args.out)
    except (NotARun, files.CheckpointError) as e:
        parser.error(str(e))
    print(f"written to {args.out}")


def is_our_page(path):
    try:
        return GENERATOR in files.read_text(path, None, files.RUN_LIMIT, "page", "replace")
    except files.CheckpointError:
        return False


# --------------------------------------------------------------------------------------------------
# charts.py


CURVES = {
    "loss": "loss: the rule's weighted cross-entropy, nats per response token",
    "ce": "training cross-entropy: each step's response tokens, unweighted (nats)",
    "ce_learned": "training cross-entropy of what the rule learns: each token's in proportion to "
    "its weight (nats)",
    "ce_set_aside": "training cross-entropy of what the rule sets aside: each token's in "
    "proportion to 1 - its weight (nats)",
    "kept": "kept: % of response tokens with a weight above 0",
    "lr": "learning rate",
    "grad_norm": "gradient norm, before clipping at 1",
}
# noisy from step to step: a moving mean is drawn over the raw line
SMOOTHED = ("loss", "ce", "ce_learned", "ce_set_aside")
READING = (
    "The loss is not comparable across rules: a token of weight 0 adds nothing to it and still "
    "counts in its denominator, so a rule that keeps fewer tokens shows a smaller loss. Compare "
    "the cross-entropies instead. A rising \u201cset aside\u201d curve is the rule at work, not "
    "a divergence: the model is not trained on those tokens, and as it moves toward what it does "
    "learn, it finds them less likely. Held-out cross-entropy (of reference solutions) is in the "
    "evaluation, not here."
)
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
    """[(step, value)] of the rows whose `key` is a finite number; kept as a percentage."""
    scale = 100 if key == "kept" else 1  # metrics.jsonl holds a fraction; every page shows %
    return [
        (r["step"], scale * r[key])
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
        [0.0, 25.0, 50.0, 75.0, 100.0]
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
    # one window for every run of the chart
    h, note = (
        half_width(max(len(pts) for *_, pts in lines)),
        "",
    )
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


if __name__ == "__main__":
    sys.exit(main())
