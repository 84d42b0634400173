"""The structure the README's package map promises, checked from the source: no import
cycles among our modules (type-only and function-level imports included), and each package
importing only the layers below it (tools/imports.py holds the table)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from tools import imports

ROOT = Path(__file__).resolve().parents[2]

# The source is parsed in a fresh interpreter: CPython 3.11.7's ast.parse can fail with
# "AST constructor recursion depth mismatch" in a long test process whose recursion
# bookkeeping earlier tests (hypothesis, deep-nesting fuzzers) have disturbed.
_GRAPH = """
import json, sys
from pathlib import Path
from tools import imports
edges = imports.graph(Path(sys.argv[1]), tuple(sys.argv[2:]) or imports.PACKAGES)
print(json.dumps({module: sorted(targets) for module, targets in edges.items()}))
"""


def _graph(root: Path = ROOT, packages: tuple[str, ...] = ()) -> imports.Graph:
    done = subprocess.run([sys.executable, "-c", _GRAPH, str(root), *packages], cwd=ROOT,
                          capture_output=True, text=True, check=True, timeout=60)
    return {module: set(targets) for module, targets in json.loads(done.stdout).items()}


def test_no_module_imports_itself_back_through_others() -> None:
    assert imports.cycles(_graph()) == []


def test_each_package_imports_only_what_its_layer_may() -> None:
    assert imports.forbidden(_graph()) == []


def test_every_package_of_the_checkout_is_checked_and_installed() -> None:
    on_disk = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "tools"}
    assert on_disk == set(imports.PACKAGES)
    assert set(imports.MAY_IMPORT) == set(imports.UNITS)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = project["tool"]["setuptools"]["packages"]["find"]["include"]
    assert {name.rstrip("*") for name in include} == set(imports.PACKAGES)


def test_the_readme_map_says_what_the_table_enforces() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `([\w.]+)/?` \|[^|]*\| ([^|]*) \|$", readme, re.M)
    said = {unit: {u.strip(" `/") for u in may.split(",") if u.strip(" -")}
            for unit, may in rows}
    assert said == {unit: set(may) for unit, may in imports.MAY_IMPORT.items()}


def _tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_a_type_only_import_back_is_a_cycle(tmp_path: Path) -> None:
    _tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/owner.py": "from pkg.part import Part\n",
        "pkg/part.py": ("from typing import TYPE_CHECKING\n"
                        "if TYPE_CHECKING:\n    from pkg.owner import Owner\n"),
        "pkg/lazy.py": "def f():\n    from . import owner\n",
    })
    edges = _graph(tmp_path, ("pkg",))
    assert edges["pkg.lazy"] == {"pkg.owner"}  # a relative import inside a function
    assert imports.cycles(edges) == [["pkg.owner", "pkg.part"]]


def test_a_name_taken_from_a_package_is_an_import_of_its_init(tmp_path: Path) -> None:
    _tree(tmp_path, {
        "pkg/__init__.py": "from .call import Call\n",
        "pkg/call.py": "from pkg.conn import Conn\n",
        "pkg/conn.py": "import pkg.call\nfrom pkg import VERSION\n",
    })
    edges = _graph(tmp_path, ("pkg",))
    assert edges["pkg.conn"] == {"pkg.call", "pkg"}
    assert imports.cycles(edges) == [["pkg", "pkg.call", "pkg.conn"]]
