"""
Opens prift's pages (a run's report.html, report.py's page of several runs) in a real browser,
headless Chromium, and checks what a person would see: no script or console errors (Chromium reports
malformed SVG there too), nothing loaded from elsewhere, the run summary present, and in every chart
one line per run (in the charts of what a rule learns and sets aside, one per run that has any: sft
sets nothing aside).

    python tests/tools/browser_check.py runs/mass/report.html compare.html --screenshots shots/

Prints one line per problem and exits 1 if there is any, 0 if none; exit 2 when there is no Chromium
(on Debian: apt-get install chromium). check_page() also checks a page's HTML without a browser.
"""

import argparse
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SUMMARY = [
    "rule",
    "signal",
    "model",
    "data",
    "examples",
    "response tokens",
    "batch",
    "learning rate",
    "precision",
    "ranks",
    "steps",
    "skipped steps",
    "training time",
    "response tokens / s",
    "mean kept",
]
# a run draws these only where it has values: sft sets nothing aside, a rule keeping no token learns
# nothing
PARTIAL = ("ce_learned", "ce_set_aside")


def chromium():
    return next(
        (p for p in map(shutil.which, ["chromium", "chromium-browser", "google-chrome"]) if p), None
    )


def render(page, screenshot=None):
    """(the DOM after Chromium has loaded `page`, its console messages); with `screenshot`, a PNG of
    1280x1600 too.
    """

    def browse(*extra):
        with tempfile.TemporaryDirectory() as profile:
            return subprocess.run(
                [
                    chromium(),
                    *FLAGS,
                    f"--user-data-dir={profile}",
                    *extra,
                    Path(page).resolve().as_uri(),
                ],
                capture_output=True,
                text=True,
                timeout=1800,  # a hung browser fails; no loaded machine takes so long
            )

    r = browse("--enable-logging=stderr", "--v=0", "--dump-dom")
    if screenshot:
        browse(
            f"--screenshot={Path(screenshot).resolve()}",
            "--window-size=1280,1600",
            "--hide-scrollbars",
        )
    return r.stdout, [line for line in r.stderr.splitlines() if ":CONSOLE" in line]


class Page(HTMLParser):
    """What the checks need from a page: its figures with their lines, summary labels, rows of the
    runs table, legend entries, and every address it would load."""

    def __init__(self, text):
        super().__init__()
        self.figures, self.labels, self.run_rows, self.legend, self.loads, self.ticks = (
            [],
            [],
            0,
            [],
            [],
            [],
        )
        self.scripts, self._in, self._table, self._key = 0, None, False, False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        if tag == "figure":
            self.figures.append({"key": a.get("data-key"), "lines": []})
        elif tag == "polyline" and "line" in classes:
            self.figures[-1]["lines"].append(a.get("data-run"))
        elif "key" in classes:
            self.legend.append("")
            self._key = True
        elif tag == "table":
            self._table = "runs" in classes
        elif tag == "tr" and self._table:
            self.run_rows += 1
        elif tag == "script":
            self.scripts += 1
        self._in = "tick" if tag == "text" and "tick" in classes else tag
        for name in ("src", "data", "srcset"):
            if a.get(name):
                self.loads.append(a[name])
        if tag == "link" or (a.get("href") or "").startswith(("http:", "https:", "//")):
            self.loads.append(a.get("href"))
        if "url(" in (a.get("style") or ""):
            self.loads.append(a["style"])

    def handle_endtag(self, tag):
        self._key = self._key and tag != "span"

    def handle_data(self, text):
        if self._in == "dt":
            self.labels.append(text.strip())
        elif self._in == "tick":
            self.ticks.append(text.strip())
        if self._key:
            self.legend[-1] += text.strip()


def check_page(text, console=()):
    """The problems a person would see on a page (its HTML, or the DOM Chromium made of it), one
    line each.
    """
    page = Page(text)
    problems = [f"console: {line.split('] ', 1)[-1]}" for line in console]
    problems += [
        f"loads {src!r}: the page must open offline, from disk alone" for src in page.loads
    ]
    problems += ["a <script> on the page: the pages need none"] * (page.scripts > 0)
    if not page.figures:
        problems.append("no chart")
    # several runs: a row each (the first is the header), a legend entry and a line in every chart
    if page.run_rows:
        runs = page.run_rows - 1
        if len(page.legend) != runs or not all(page.legend):
            problems.append(
                f"the legend names {len(list(filter(None, page.legend)))} runs, the table "
                f"has {runs}"
            )
        for fig in page.figures:
            drawn = len(set(fig["lines"]))
            if fig["key"] in PARTIAL and 0 < drawn == len(fig["lines"]) <= runs:
                continue
            if len(fig["lines"]) != runs or drawn != runs:
                problems.append(
                    f"chart {fig['key']}: {len(fig['lines'])} lines "
                    f"({len(set(fig['lines']))} runs), "
                    f"expected one for each of the {runs} runs"
                )
    else:  # one run: its summary, and one line in each chart
        problems += [f"summary: no {label!r}" for label in SUMMARY if label not in page.labels]
        problems += [
            f"chart {fig['key']}: {len(fig['lines'])} lines, expected 1"
            for fig in page.figures
            if len(fig["lines"]) != 1
        ]
    if len(page.ticks) < 4 * len(page.figures):
        problems.append(
            f"{len(page.ticks)} tick labels on {len(page.figures)} charts: axes need a few each"
        )
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("pages", nargs="+", type=Path)
    parser.add_argument("--screenshots", type=Path, help="a folder for a PNG of each page")
    args = parser.parse_args(argv)
    if not chromium():
        print(
            "browser_check: no Chromium found (on Debian: apt-get install chromium)",
            file=sys.stderr,
        )
        return 2
    failed = False
    for page in args.pages:
        shot = None
        if args.screenshots:
            args.screenshots.mkdir(parents=True, exist_ok=True)
            shot = args.screenshots / f"{page.resolve().parent.name}-{page.stem}.png"
        dom, console = render(page, shot)
        problems = check_page(dom, console) if dom.strip() else ["Chromium rendered nothing"]
        failed |= bool(problems)
        print(
            "\n".join(f"{page}: {p}" for p in problems)
            or f"{page}: ok" + (f" (screenshot {shot})" if shot else "")
        )
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
