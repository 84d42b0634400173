"""The project's import graph, read from the source (nothing is imported or run).

    python tools/imports.py            modules, their imports of ours, and every cycle
    python tools/imports.py --units    the same, one node per package (README "Packages")
    python tools/imports.py --cycles   only the cycles (exit status 1 if there is one)
    python tools/imports.py --check    also the imports the layer table below forbids
    python tools/imports.py --root DIR another checkout (a `git worktree` of an old commit)

Every import counts: at module level, inside functions, and under `if TYPE_CHECKING:`,
since a type-only import still ties the two modules together for a reader and a refactor.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The project's packages: the libraries, then the programs built on them.
PACKAGES = ("appliance", "supervisor", "workers", "reference_aps", "deskphone",
            "appliance_sdk", "launcher", "bench")
# One node per unit in --units: a library layer or a program.
UNITS = ("appliance.core", "appliance.sip", "appliance.media", "appliance.ice",
         "appliance.native", "appliance.recording", "appliance.edges", "appliance",
         *PACKAGES[1:])

# What each unit may import of ours: the layers, lowest first, then the programs. A library
# never imports a program; programs share only libraries (the supervisor and the workers
# talk over the bus, never through each other's code); the launcher and the bench start
# and drive the others. README "Packages" shows this table to the operator.
MAY_IMPORT: dict[str, tuple[str, ...]] = {
    "appliance.core": (),
    "appliance.sip": ("appliance.core",),
    "appliance.media": ("appliance.core",),
    "appliance.ice": ("appliance.core",),
    "appliance.native": (),
    "appliance.recording": ("appliance.core", "appliance.media"),
    "appliance.edges": ("appliance.core", "appliance.sip", "appliance.media", "appliance.ice",
                        "appliance.native"),
    "appliance": (),
    "supervisor": ("appliance.core", "appliance.sip", "appliance.recording", "appliance.edges"),
    "workers": ("appliance.core", "appliance.sip", "appliance.media", "appliance.ice",
                "appliance.native", "appliance.recording", "appliance.edges"),
    "reference_aps": ("appliance.core",),
    "deskphone": ("appliance.core", "appliance.sip"),
    "appliance_sdk": ("appliance.core", "appliance.edges"),
    "launcher": ("appliance.core", "appliance.recording", "appliance.edges", "supervisor",
                 "reference_aps", "deskphone"),
    "bench": ("appliance.core", "appliance.sip", "appliance.media", "appliance.ice",
              "appliance.native", "appliance.edges", "appliance_sdk", "reference_aps",
              "deskphone"),
}

Graph = dict[str, set[str]]


def module_files(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Every module of ours by dotted name (a package is its __init__)."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _imports(tree: ast.AST, module: str, is_package: bool, files: set[str]) -> set[str]:
    """Our modules that this module's import statements name, relative imports resolved.

    `from a import b` names module a.b when there is one, else module a (b is a name in
    it). `import a.b` names a.b. The parent packages Python also runs on the way are not
    counted: an `__init__` that gathers its submodules would otherwise close a cycle with
    every one of them.
    """
    found: set[str] = set()

    def add(name: str) -> None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join([*base, *([node.module] if node.module else [])])
            else:
                prefix = node.module or ""
            for alias in node.names:
                full = f"{prefix}.{alias.name}"
                add(full if full in files else prefix)
    return found


def graph(root: Path = ROOT, packages: tuple[str, ...] = PACKAGES) -> Graph:
    files = module_files(root, packages)
    return {module: _imports(ast.parse(path.read_text(), str(path)), module,
                             path.name == "__init__.py", set(files))
            for module, path in files.items()}


def unit_of(module: str) -> str:
    return next(u for u in UNITS if module == u or module.startswith(u + "."))


def units(edges: Graph) -> Graph:
    out: Graph = {}
    for module, targets in edges.items():
        mine = unit_of(module)
        out.setdefault(mine, set()).update(unit_of(t) for t in targets if unit_of(t) != mine)
    return out


def cycles(edges: Graph) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(node: str) -> None:
        nonlocal counter
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return sorted(found)


def forbidden(edges: Graph) -> list[tuple[str, str]]:
    """(module, import) pairs whose units the layer table does not allow."""
    return sorted((module, target) for module, targets in edges.items() for target in targets
                  if unit_of(target) != unit_of(module)
                  and unit_of(target) not in MAY_IMPORT[unit_of(module)])


def _print(edges: Graph) -> None:
    for node in sorted(edges):
        targets = ", ".join(sorted(edges[node])) or "-"
        print(f"{node} -> {targets}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/imports.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--units", action="store_true", help="one node per package")
    parser.add_argument("--cycles", action="store_true", help="print only the cycles")
    parser.add_argument("--check", action="store_true",
                        help="also print the imports the layers forbid; exit 1 on any")
    parser.add_argument("--root", type=Path, default=ROOT,
                        help="another checkout, e.g. a `git worktree` of an older commit")
    args = parser.parse_args(argv)
    modules = graph(args.root)
    shown = units(modules) if args.units else modules
    if not args.cycles:
        _print(shown)
    found = cycles(modules)
    print(f"\n{len(modules)} modules, {sum(len(t) for t in modules.values())} imports "
          f"between them, {len(found)} cycle(s)")
    for number, component in enumerate(found, 1):
        print(f"cycle {number}: {' <-> '.join(component)}")
    if args.units:
        for number, component in enumerate(cycles(shown), 1):
            print(f"package cycle {number}: {' <-> '.join(component)}")
    wrong = forbidden(modules) if args.check else []
    for module, target in wrong:
        print(f"forbidden: {module} ({unit_of(module)}) imports {target} ({unit_of(target)})")
    return 1 if found or wrong else 0


if __name__ == "__main__":
    sys.exit(main())
