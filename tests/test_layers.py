"""The package layers of moekd and the rule that imports run one way: a module imports only from
its own package or from lower layers (function-local imports included), so there are no cycles."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "moekd"

# Lowest first. A unit is a subpackage or a top-level module of moekd.
LAYERS = [
    {"errors", "interrupt"},  # the one exception users see; how a run stops on a signal
    {"paths", "seeds", "schemas", "locking", "fsio", "options"},  # paths, seeds, metadata, locks, files, flags
    {"data", "models", "distributed", "encodings"},  # rows and tokens, checkpoints, ranks, codecs
    {"store", "routing"},  # reading and writing stores; recognising and rerouting routers
    {"training", "routers"},  # what every training loop uses; routers.py re-exports routing's API
    {"cache_builder", "distill"},  # the two recipes: build a cache, train from one
    {"eval"},  # scoring (its likelihood scores use the build's teacher passes)
    {"sar"},  # Student-Aware Router training (generates with eval, trains with distill)
    {"tiny_weights", "experiments"},  # tiny models' weights; replicate statistics
    {"tiny_models", "tiny_routing"},
    {"families"},
    {"demo"},
    {"cli"},
    {"__main__", "__init__"},
]
LEVEL = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def unit_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def imported_units(path: Path) -> set[str]:
    units = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names if node.module == "moekd"]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "moekd" and len(parts) > 1:
                units.add(parts[1])
    return units


MODULES = sorted(ROOT.rglob("*.py"))


def test_every_unit_has_a_layer():
    assert {unit_of(p) for p in MODULES} <= set(LEVEL), "add new packages to LAYERS"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_one_way(path):
    own = unit_of(path)
    wrong = {u for u in imported_units(path) - {own} if u in LEVEL and LEVEL[u] >= LEVEL[own]}
    assert not wrong, f"moekd.{own} (layer {LEVEL[own]}) imports {sorted(wrong)} from its own layer or above"


def test_the_check_sees_function_local_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from moekd.cli.app import app\n    import moekd.demo\n")
    assert imported_units(module) == {"cli", "demo"}
