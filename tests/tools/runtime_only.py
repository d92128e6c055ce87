"""Run a script as a fresh `pip install -r requirements.txt` environment would, inside this one:

    python tests/tools/runtime_only.py SCRIPT [ARGS ...]

CI's environment also holds the test requirements (pytest, transformers, and what they bring, numpy
among them), so a runtime import of something requirements.txt does not install would go unnoticed
there. Here every top-level module is refused unless it belongs to the standard library, to this
repository, or to a distribution that requirements.txt installs, directly or through the
dependencies those distributions declare (read from their installed metadata, so the list cannot
drift from what pip would install). A refused module is absent, exactly as in a fresh environment.
"""

import sys

PRELOADED = {
    name.partition(".")[0] for name in sys.modules
}  # what the interpreter itself loaded at start

import importlib.abc
import importlib.machinery
import importlib.metadata as md
import re
import runpy
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]


def canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_lines(path):
    """Requirement strings of a requirements file, following `-r other.txt` includes."""
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line.startswith("-r"):
            out += requirement_lines(Path(path).parent / line[2:].strip())
        elif line:
            out.append(line)
    return out


def runtime_distributions(path=ROOT / "requirements.txt"):
    """Canonical names of the distributions requirements.txt installs: its own and, recursively,
    what their metadata requires (with environment markers evaluated, extras not taken)."""
    env = {**default_environment(), "extra": ""}
    todo = [Requirement(line) for line in requirement_lines(path)]
    seen = set()
    while todo:
        req = todo.pop()
        name = canonical(req.name)
        if name in seen or (req.marker and not req.marker.evaluate(env)):
            continue
        try:
            requires = md.requires(req.name) or []
        except md.PackageNotFoundError:
            raise SystemExit(
                f"runtime_only: {req.name} is required but not installed here; pip install "
                "-r requirements.txt"
            )
        seen.add(name)
        todo += [Requirement(r) for r in requires]
    return seen


def allowed_modules():
    """Top-level modules of the distributions requirements.txt installs."""
    dists = runtime_distributions()
    return {
        mod
        for mod, owners in md.packages_distributions().items()
        if any(canonical(d) in dists for d in owners)
    }


class RuntimeOnly(importlib.abc.MetaPathFinder):
    """Takes site-packages off the import path and finds there only the allowed top-level modules. A
    module of another distribution is then absent, to `import` (ModuleNotFoundError) and to
    `importlib.util.find_spec` (None) alike; the standard library and this repository's files import
    as usual."""

    def __init__(self, allowed):
        self.allowed = allowed
        self.site = [p for p in sys.path if Path(p).name in ("site-packages", "dist-packages")]
        sys.path[:] = [p for p in sys.path if p not in self.site]

    def find_spec(self, fullname, path=None, target=None):
        if path is None and (fullname in self.allowed or fullname in PRELOADED):
            return importlib.machinery.PathFinder.find_spec(fullname, self.site)
        # a submodule (its package is let in already), or not allowed: the ordinary finders decide
        return None


if __name__ == "__main__":
    allowed = allowed_modules()
    sys.meta_path.insert(0, RuntimeOnly(allowed))
    script, sys.argv = sys.argv[1], sys.argv[1:]
    sys.path[0] = str(Path(script).resolve().parent)
    runpy.run_path(script, run_name="__main__")
