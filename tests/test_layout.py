"""The repository's layout rules, checked on the source text (AST only, nothing is imported).

- layering: the packages form one line, ``common -> sensors -> demodata -> export -> training ->
  runtime -> benchmarks``; a package imports only itself, packages to its left, the standard
  library and third-party packages. ``demodata`` (offline demo data) is further imported only by
  ``runtime`` (its dataset sources, the demo, the launcher, the scripted operator), ``benchmarks``
  and the tests, so nothing a robot runs for real depends on the demo data;
- size: no module of the shipped packages over ``MAX_LINES`` lines;
- docstrings: every module starts with one whose first line says in one sentence what it is for;
- names: no ``features.py`` (say which features: ``backbone_stage``, ``feature_cache``...) and no
  import of the modules that moved out of ``sensors`` (``sensors.config``/``atomic``/``datasets``).

Each test collects every violation and reports them all in one assertion message.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = ("common", "sensors", "demodata", "export", "training", "runtime", "benchmarks")
SHIPPED = ("common", "sensors", "demodata", "export", "training", "runtime")  # the size rule
DEMODATA_USERS = {"demodata", "runtime", "benchmarks"}  # and tests/
MAX_LINES = 500
MAX_SUMMARY = 110  # characters of the docstring's first source line, quotes included (under this)
MOVED = re.compile(r"^sensors\.(config|atomic|datasets)(\.|$)")
# abbreviations whose period does not end a sentence
_ABBREVIATIONS = re.compile(r"\b(e\.g|i\.e|etc|vs|cf|al)\.", re.IGNORECASE)


def _modules(packages: tuple[str, ...], root: Path = ROOT) -> list[Path]:
    return sorted(p for pkg in packages for p in (root / pkg).rglob("*.py") if "__pycache__" not in p.parts)


@cache
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _rel(path: Path, root: Path = ROOT) -> str:
    return path.relative_to(root).as_posix()


def _imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, lazy and TYPE_CHECKING ones included."""
    package_parts = list(path.relative_to(root).parent.parts)
    found = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importing file's package
                base = package_parts[: len(package_parts) - node.level + 1]
                found.append((node.lineno, ".".join([*base, *([node.module] if node.module else [])])))
            elif node.module:
                found.append((node.lineno, node.module))
    return found


def _layering_violations(root: Path = ROOT) -> list[str]:
    rank = {pkg: i for i, pkg in enumerate(ORDER)}
    bad = []
    for path in _modules(ORDER, root):
        own = path.relative_to(root).parts[0]
        for line, module in _imports(path, root):
            target = module.split(".")[0]
            if target not in rank:
                continue  # standard library or third party
            if rank[target] > rank[own]:
                bad.append(f"{_rel(path, root)}:{line}: {own} imports {module} (to its right: {' -> '.join(ORDER)})")
            elif target == "demodata" and own not in DEMODATA_USERS:
                bad.append(f"{_rel(path, root)}:{line}: {own} imports {module} (demodata is for runtime, benchmarks "
                           "and tests only)")
    return bad


def test_packages_import_only_leftwards() -> None:
    bad = _layering_violations()
    assert not bad, f"{len(bad)} import(s) against the package order:\n" + "\n".join(bad)


def test_the_layering_check_itself_catches_every_kind_of_wrong_import(tmp_path: Path) -> None:
    """A check that found nothing must be a check that looked: plant each kind of violation."""
    files = {
        "common/ok.py": "import numpy\nfrom common import atomic\n",
        "sensors/wire.py": "from common.config import ConfigError\nfrom . import errors\n",
        "sensors/bad.py": "def f():\n    from runtime.errors import CommandError\n",  # lazy, rightwards
        "export/bad.py": "import demodata.store\n",  # leftwards, but demodata is for runtime only
        "training/sub/bad.py": "from ...benchmarks import harness\n",  # relative, rightwards
        "runtime/ok.py": "from demodata.store import load\nfrom training import learner\n",
        "benchmarks/ok.py": "import runtime.agent\nimport demodata\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert _layering_violations(tmp_path) == [
        "export/bad.py:1: export imports demodata.store (demodata is for runtime, benchmarks and tests only)",
        f"sensors/bad.py:2: sensors imports runtime.errors (to its right: {' -> '.join(ORDER)})",
        f"training/sub/bad.py:1: training imports benchmarks (to its right: {' -> '.join(ORDER)})",
    ]


def test_no_shipped_module_is_over_the_line_limit() -> None:
    bad = []
    for path in _modules(SHIPPED):
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_LINES:
            bad.append(f"{_rel(path)}: {n} lines")
    assert not bad, f"modules over {MAX_LINES} lines (split them by job):\n" + "\n".join(bad)


def _summary_problem(path: Path) -> str | None:
    """Why the module docstring's first line is not a one-sentence summary (None: it is)."""
    tree = _tree(path)
    doc = ast.get_docstring(tree, clean=False)
    if doc is None:
        return "no module docstring"
    first = doc.strip().splitlines()[0].strip() if doc.strip() else ""
    if not first:
        return "the docstring's first line is empty"
    source_line = path.read_text(encoding="utf-8").splitlines()[tree.body[0].lineno - 1]
    if len(source_line) >= MAX_SUMMARY:
        return f"first line is {len(source_line)} characters with its quotes (keep it under {MAX_SUMMARY})"
    if not first.endswith("."):
        return f"first line does not end a sentence: {first!r}"
    if re.search(r"[.!?]\s+\S", _ABBREVIATIONS.sub("", first)):
        return f"first line holds more than one sentence: {first!r}"
    return None


def test_every_module_says_what_it_is_for_in_its_first_line() -> None:
    bad = [f"{_rel(p)}: {why}" for p in _modules(ORDER) if (why := _summary_problem(p))]
    assert not bad, "module docstrings without a one-sentence first line:\n" + "\n".join(bad)


def test_no_vague_module_names_and_no_imports_of_moved_modules() -> None:
    bad = [f"{_rel(p)}: name the features (backbone_stage, feature_cache...)" for p in _modules(ORDER)
           if p.name == "features.py"]
    for path in _modules((*ORDER, "tests")):
        bad += [f"{_rel(path)}:{line}: imports {module} (moved to common/ or demodata/)"
                for line, module in _imports(path) if MOVED.match(module)]
        for node in ast.walk(_tree(path)):  # python -m / importlib module names given as strings
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and MOVED.match(node.value):
                bad.append(f"{_rel(path)}:{node.lineno}: names module {node.value!r} (moved to common/ or demodata/)")
    assert not bad, "\n".join(bad)


def _readme_table() -> dict[str, set[str]]:
    """Package -> the module names (``x.py``, ``sub/``) in the README's package table."""
    rows: dict[str, set[str]] = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        m = re.match(r"^\| `(\w+)/` \|[^|]*\|([^|]*)\|$", line)
        if m and m.group(1) in ORDER:
            rows[m.group(1)] = set(re.findall(r"`([\w]+(?:\.py|/))`", m.group(2)))
    return rows


def test_the_readme_package_table_matches_the_tree() -> None:
    """Every package has a row, and a row names exactly its modules (``__init__.py`` aside) and subpackages."""
    rows = _readme_table()
    assert set(rows) == set(ORDER), f"README package table rows {sorted(rows)} != packages {list(ORDER)}"
    for pkg, named in rows.items():
        here = {p.name for p in (ROOT / pkg).glob("*.py") if p.name != "__init__.py"}
        here |= {p.parent.name + "/" for p in (ROOT / pkg).glob("*/__init__.py")}
        assert named == here, (f"README row `{pkg}/`: missing {sorted(here - named)}, "
                               f"not in the tree {sorted(named - here)}")
