"""
Which way imports point, as docs/architecture.rst draws them.

The modules are read with ``ast`` (nothing is imported), so a test names the
import that breaks a rule, with its file and line.
"""

from __future__ import annotations

import ast
import os
from typing import Iterator

from twisted.trial.unittest import SynchronousTestCase

import shardtcp

PACKAGE_DIR = os.path.dirname(os.path.abspath(shardtcp.__file__))

# The floor: values, codecs and pure parsers that import nothing of the project.
FLOOR = {
    "shardtcp.net",
    "shardtcp.eventloop",
    "shardtcp.jws",
    "shardtcp.tlslayer",
    "shardtcp.identify.types",
    "shardtcp.proxy.splice",
    "shardtcp.resolver.agent",
    "shardtcp.resolver.choice",
    "shardtcp.resolver.interfaces",
    "shardtcp.resolver.snapshot",
}

# One floor up: they may import the floor and each other, nothing else.
CODECS = {
    "shardtcp.model",
    "shardtcp.proxyv2",
    "shardtcp.policy",
    "shardtcp.keys",
    "shardtcp.identify.names",
    "shardtcp.identify.clienthello",
    "shardtcp.identify.preamble",
    "shardtcp.identify.detect",
}


def _module_name(path: str) -> str:
    relative = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))
    name = relative[: -len(".py")].replace(os.sep, ".")
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _modules() -> dict[str, str]:
    found = {}
    for folder, _, files in os.walk(PACKAGE_DIR):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                found[_module_name(path)] = path
    return found


MODULES = _modules()


def _imports(name: str) -> Iterator[tuple[str, int]]:
    """The project modules ``name`` imports, with the line of each import."""
    path = MODULES[name]
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target in MODULES and target != name:
                yield target, node.lineno


def _within(name: str, packages: tuple) -> bool:
    """Whether module ``name`` is one of ``packages`` or inside one of them."""
    return any(name == p or name.startswith(p + ".") for p in packages)


def _closure(name: str) -> dict[str, tuple[str, int]]:
    """Every project module reachable from ``name``, with how it was reached."""
    seen: dict[str, tuple[str, int]] = {}
    todo = [name]
    while todo:
        current = todo.pop()
        for target, line in _imports(current):
            if target not in seen and target != name:
                seen[target] = (current, line)
                todo.append(target)
    return seen


class LayeringTests(SynchronousTestCase):
    """The import rules of docs/architecture.rst hold for every module."""

    def test_modules_found(self):
        """The scan sees the package (a broken scan would pass every rule)."""
        for name in FLOOR | CODECS | {"shardtcp.tap", "shardtcp.backend", "shardtcp.workers.aggregate"}:
            self.assertIn(name, MODULES)

    def test_floor_imports_nothing_of_the_project(self):
        """Values, codecs and pure parsers at the floor import no project module."""
        for name in sorted(FLOOR):
            found = [t for t, _ in _imports(name) if t != "shardtcp"]
            self.assertEqual(found, [], f"{name} imports {found}")

    def test_codecs_import_only_downwards(self):
        """The codec floor imports only the floor and itself."""
        allowed = FLOOR | CODECS | {"shardtcp"}
        for name in sorted(CODECS):
            for target, line in _imports(name):
                self.assertIn(target, allowed, f"{name}:{line} imports {target}")

    def test_resolver_knows_no_protocol(self):
        """Nothing the resolver reaches imports the connection path, the identifiers or the tree."""
        banned = ("shardtcp.proxy", "shardtcp.identify", "shardtcp.tap", "shardtcp.cli", "shardtcp.admin")
        for name in sorted(n for n in MODULES if n.startswith("shardtcp.resolver")):
            for target, (via, line) in _closure(name).items():
                self.assertFalse(_within(target, banned), f"{name} reaches {target} ({via}:{line})")

    def test_shard_library_never_imports_the_proxy(self):
        """``shardtcp.backend`` reaches neither the proxy, the resolver nor its configuration."""
        banned = ("shardtcp.proxy", "shardtcp.resolver", "shardtcp.config", "shardtcp.tap", "shardtcp.admin")
        for target, (via, line) in _closure("shardtcp.backend").items():
            self.assertFalse(_within(target, banned), f"backend reaches {target} ({via}:{line})")

    def test_product_never_imports_the_example(self):
        """Only the command line and the example itself import ``shardtcp.example``."""
        for name in sorted(MODULES):
            if name.startswith("shardtcp.example") or name == "shardtcp.cli":
                continue
            for target, line in _imports(name):
                self.assertFalse(
                    _within(target, ("shardtcp.example",)), f"{name}:{line} imports {target}"
                )

    def test_workers_import_only_what_they_sum(self):
        """``shardtcp.workers.aggregate`` and ``channel`` import only the resolver, the registry,
        metrics, config, model and the floor (and their own package); nothing of the connection
        path, admin, tap or cli."""
        allowed = (
            "shardtcp.workers", "shardtcp.resolver", "shardtcp.registry", "shardtcp.metrics",
            "shardtcp.config", "shardtcp.model",
        )
        for name in ("shardtcp.workers.aggregate", "shardtcp.workers.channel"):
            for target, line in _imports(name):
                if target == "shardtcp" or target in FLOOR:
                    continue
                self.assertTrue(_within(target, allowed), f"{name}:{line} imports {target}")

    def test_supervisor_and_child_sit_beside_tap(self):
        """The supervisor and the worker entry point build on ``tap``: only ``tap`` imports them."""
        top = ("shardtcp.workers.supervisor", "shardtcp.workers.child")
        self.assertIn("shardtcp.workers.supervisor", [t for t, _ in _imports("shardtcp.tap")])
        for name in sorted(MODULES):
            if name in top or name == "shardtcp.tap":
                continue
            for target, line in _imports(name):
                self.assertNotIn(target, top, f"{name}:{line} imports {target}")

    def test_nothing_below_imports_workers(self):
        """Neither the floor, the codecs nor anything the resolver reaches imports ``shardtcp.workers``."""
        below = FLOOR | CODECS | {n for n in MODULES if n.startswith("shardtcp.resolver")}
        for name in sorted(below):
            for target, (via, line) in _closure(name).items():
                self.assertFalse(_within(target, ("shardtcp.workers",)), f"{name} reaches {target} ({via}:{line})")
