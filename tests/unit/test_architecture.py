"""The import graph keeps the layers of docs/architecture.md (checked over the source, with ast).

Every ``import`` and ``from ... import`` counts, also the ones inside functions: a lazy import
is still a dependency. A rule that code outside this test's owner's zone breaks today is
marked ``xfail(strict=True)`` with the module and the owner named, so it turns into a failure
(and the lead flips it) the moment the module is fixed.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {  # importable name -> source folder
    "netkv": ROOT / "netkv",
    "netkv_agent": ROOT / "agents" / "netkv_agent",
    "netkv_oracle": ROOT / "services" / "netkv_oracle",
    "netkv_scheduler": ROOT / "services" / "netkv_scheduler",
    "netkv_proxy": ROOT / "services" / "netkv_proxy",
}
SERVICES = ("netkv_oracle", "netkv_scheduler", "netkv_proxy")
IO_LIBRARIES = ("redis", "aiohttp", "aiomqtt", "msgpack", "msgspec", "pyroute2", "yaml")


def _module_name(package: str, path: Path) -> str:
    rel = path.relative_to(PACKAGES[package]).with_suffix("")
    parts = [package, *rel.parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(prefix: str) -> Iterator[tuple[str, Path]]:
    """(module name, file) of every module whose name is ``prefix`` or under it."""
    package = prefix.split(".", maxsplit=1)[0]
    folder = PACKAGES[package]
    if not folder.exists():
        return
    for path in sorted(folder.rglob("*.py")):
        name = _module_name(package, path)
        if name == prefix or name.startswith(prefix + "."):
            yield name, path


def imports(name: str, path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def violations(prefix: str, forbidden: tuple[str, ...]) -> list[str]:
    """``module -> imported`` for every import under ``prefix`` of a forbidden name."""
    out = []
    for name, path in modules(prefix):
        for imported in sorted(imports(name, path)):
            if any(imported == f or imported.startswith(f + ".") for f in forbidden):
                out.append(f"{name} -> {imported}")
    return out


def test_the_checker_sees_imports() -> None:
    """The checker itself: it finds a known import (so an empty result means something)."""
    assert "netkv.core.topology" in imports(*next(iter(modules("netkv.core.congestion"))))
    assert violations("netkv.contracts.wire", ("msgspec",))


CORE_FORBIDDEN = (*IO_LIBRARIES, "netkv_agent", *SERVICES, "netkv.sim", "netkv.testbed",
                  "netkv.contracts", "netkv.adapters", "netkv.bench", "netkv.up", "netkv.cli",
                  "netkv.localservers", "socket", "asyncio", "subprocess")


@pytest.mark.xfail(strict=True, reason="netkv.core.topology_file reads YAML files (imports "
                   "yaml and does file I/O): topology file reading belongs in an adapter; "
                   "owner C (evaluation)")
def test_core_is_pure() -> None:
    """The core does no file or network I/O and no wire codecs, and knows no process."""
    assert violations("netkv.core", CORE_FORBIDDEN) == []


def test_core_is_pure_except_topology_files() -> None:
    """The same rule with C's one known exception left out, so that nothing else slips in
    while that module waits for its move."""
    found = [v for v in violations("netkv.core", CORE_FORBIDDEN)
             if not v.startswith("netkv.core.topology_file ->")]
    assert found == []


def test_contracts_import_only_core() -> None:
    """Contracts are data: they may use the core's types, never an adapter, service,
    agent, simulator or testbed."""
    forbidden = ("netkv_agent", *SERVICES, "netkv.adapters", "netkv.sim", "netkv.testbed",
                 "netkv.bench", "redis", "aiohttp", "aiomqtt", "pyroute2", "yaml", "msgpack")
    assert violations("netkv.contracts", forbidden) == []


def test_adapters_know_no_process() -> None:
    assert violations("netkv.adapters", ("netkv_agent", *SERVICES, "netkv.sim",
                                         "netkv.testbed")) == []


@pytest.mark.parametrize("service", SERVICES)
def test_services_do_not_import_each_other_or_the_agent(service: str) -> None:
    others = tuple(s for s in SERVICES if s != service)
    assert violations(service, (*others, "netkv_agent", "netkv.sim", "netkv.testbed")) == []


def test_the_agent_imports_no_service() -> None:
    assert violations("netkv_agent", (*SERVICES, "netkv.sim", "netkv.testbed")) == []
