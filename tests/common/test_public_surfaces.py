"""The shared libraries' public surfaces hold: each ``libs`` module lists its public names in ``__all__``, and the
mesh's code (``libs``, ``services``, ``dev``, ``bench``) imports nothing else from it. Tests may reach further in."""

from __future__ import annotations

import ast
import importlib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CALLERS = ("libs", "services", "dev", "bench")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _declared(path: Path) -> set[str] | None:
    """The names in the module's ``__all__``, or None when it has none."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            value = ast.literal_eval(node.value)
            return set(value)
    return None


def _libs_modules() -> dict[str, Path]:
    return {_module_name(path): path for path in (ROOT / "libs").rglob("*.py") if path.name != "__init__.py"}


def _imports_from_libs(modules: dict[str, Path]) -> Iterator[tuple[str, int, str, str]]:
    """(importing file, line, libs module, name) for every ``from libs.x.y import name`` in the callers."""
    for caller in CALLERS:
        for path in (ROOT / caller).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
                    for alias in node.names:
                        yield str(path.relative_to(ROOT)), node.lineno, node.module, alias.name


def test_every_libs_module_declares_its_public_names() -> None:
    undeclared = [name for name, path in _libs_modules().items() if _declared(path) is None]
    assert undeclared == []


def test_every_declared_name_exists() -> None:
    missing = []
    for name in _libs_modules():
        module = importlib.import_module(name)
        missing += [f"{name}.{declared}" for declared in module.__all__ if not hasattr(module, declared)]
    assert missing == []


def test_the_mesh_imports_only_declared_names_from_libs() -> None:
    modules = _libs_modules()
    declared = {name: _declared(path) or set() for name, path in modules.items()}
    private = [f"{caller}:{line} imports {name} from {module}"
               for caller, line, module, name in _imports_from_libs(modules) if name not in declared[module]]
    assert private == []


def test_the_scan_sees_the_imports_it_checks() -> None:
    seen = {(module, name) for _, _, module, name in _imports_from_libs(_libs_modules())}
    assert ("libs.common.errors", "InvalidArgument") in seen
    assert ("libs.providers.base", "ProviderAdapter") in seen
