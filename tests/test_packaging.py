"""The distribution's name: ``continua`` on the public index is another project's."""

from __future__ import annotations

import importlib.metadata as md
import re
from pathlib import Path

from common.config import tomllib

REPO = Path(__file__).resolve().parents[1]
DIST = "continua-robot"


def test_distribution_is_not_named_like_the_other_projects_on_pypi() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["name"] == DIST
    own = {re.match(r"[A-Za-z0-9_.-]+", r).group(0) for extra in project["optional-dependencies"].values()
           for r in extra if r.startswith("continua")}
    assert own == {DIST}  # the "all" extra refers to this distribution, never to "continua"


def test_the_installed_distribution_is_this_checkout() -> None:
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    dist = md.distribution(DIST)
    assert dist.metadata["Name"] == DIST and dist.version == version
    assert "continua" not in {d.metadata["Name"] for d in md.distributions()}



def test_make_bench_regenerates_every_figure_the_readme_quotes() -> None:
    """A README figure names its command as ``python -m benchmarks.NAME ARGS``; ``make bench`` runs each."""
    readme = (REPO / "README.md").read_text()
    quoted = {" ".join(m.split()) for m in re.findall(r"`python -m benchmarks\.([^`]+)`", readme)}
    make = (REPO / "Makefile").read_text()
    listed = re.search(r"^BENCHMARKS := (.*?)\n(?=bench:)", make, re.S | re.M).group(1).replace("\\\n", " ")
    run = {" ".join((q or w).split()) for q, w in re.findall(r'"([^"]+)"|(\S+)', listed)}
    assert quoted and quoted <= run, sorted(quoted - run)
