"""The plugin registries and the package's seams: what imports what.

The seams of ARCHITECTURE.md are checked on the source itself: `config` is a leaf,
`kv` imports neither `selection` nor `prefetch`, and a registry imports a built-in
only when it is asked for by name.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from speckv.config import EngineConfig
from speckv.plugins import check_names, known
from speckv.registry import Registry

PACKAGE = Path(__file__).resolve().parent.parent / "speckv"


def _imports(path: Path) -> set[str]:
    """Every module `path` imports (at any depth of the file)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_config_is_a_leaf():
    own = {m for m in _imports(PACKAGE / "config.py") if m.startswith("speckv")}
    assert own == {"speckv.util"}


def test_kv_imports_neither_selection_nor_prefetch():
    for path in (PACKAGE / "kv").glob("*.py"):
        bad = {m for m in _imports(path) if m.startswith(("speckv.selection", "speckv.prefetch"))}
        assert not bad, f"{path.name} imports {bad}"


def test_a_builtin_is_imported_only_when_asked_for_by_name():
    module = "speckv_test_plugin_module"
    registry = Registry("thing", {"decoder": f"{module}:Decoder"})
    assert registry.names() == ["decoder"] and "decoder" in registry
    assert module not in sys.modules  # listing names imported nothing
    with pytest.raises(ModuleNotFoundError):
        registry.get("decoder")  # the module is imported on first lookup
    json_registry = Registry("thing", {"decoder": "json:JSONDecoder"})
    cls = json_registry.get("decoder")
    assert cls.__name__ == "JSONDecoder" and cls.name == "decoder"


def test_unknown_and_duplicate_names_are_refused_listing_the_known():
    registry = Registry("widget", {"a": "json:JSONDecoder"})

    @registry.register("b")
    class B:
        pass

    assert registry.names() == ["a", "b"] and registry.get("b") is B and B.name == "b"
    with pytest.raises(ValueError, match="unknown widget 'c'; known: a, b"):
        registry.get("c")
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        registry.add("a", B)


@pytest.mark.parametrize("options, message", [
    (dict(pool="disk"), "unknown pool backend 'disk'; known: none, local, memnode"),
    (dict(pool="local", codec="int3"), "unknown codec 'int3'; known codecs: .*int8"),
    (dict(selector="psychic"), "unknown selector 'psychic'; known: .*quest"),
    (dict(pool="local", predictor="crystal"), "unknown predictor 'crystal'; known: none, "),
    (dict(pool="local", eviction="mru"), "unknown eviction policy 'mru'; known: fifo, lru"),
])
def test_plugin_names_are_checked_against_the_registries(options, message):
    config = EngineConfig.from_kwargs(**options)  # the config checks form only
    with pytest.raises(ValueError, match=message):
        check_names(config)


def test_help_lists_every_registered_plugin():
    assert {"none", "int8", "kivi4", "<codec>+zstd"} <= set(known("codec"))
    assert known("pool")[0] == "none" and "memnode" in known("pool")
