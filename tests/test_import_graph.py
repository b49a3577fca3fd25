"""The regext package is a layered DAG: imports point only downward.

    leaves    _dtensor, _engines, _validation, _fastpath, _groups, _grad, _meta, _batching, reference, _named,
              no_decay, _nonfinite, _metric
    adapters  distributed (all DTensor logic), distributed_groups (the group lasso on
              DTensors), _zero3 (DeepSpeed ZeRO-3 partitions), penalty (autograd)
    features  grad, prox, sparsity, optim, selection
    package   __init__

A module may import only modules of lower layers (or, among leaves, leaves that
come before it in the list above), and never another module's underscored names.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "regext"
LAYERS = [
    ["_dtensor", "_engines", "_validation", "_fastpath", "_groups", "_grad", "_meta", "_batching", "reference", "_named",
     "no_decay", "_nonfinite", "_metric"],
    ["distributed", "distributed_groups", "_zero3", "penalty"],
    ["grad", "prox", "sparsity", "optim", "selection"],
    ["__init__"],
]
RANK = {name: (layer, i) for layer, names in enumerate(LAYERS) for i, name in enumerate(names)}


def modules():
    return sorted(p.stem for p in PACKAGE.glob("*.py"))


def imports_of(name):
    """(module, imported names) for every regext module this one imports, anywhere in it."""
    tree = ast.parse((PACKAGE / f"{name}.py").read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "regext":
                found += [(a.name, ()) for a in node.names]
            elif node.module.startswith("regext."):
                found.append((node.module.split(".")[1], tuple(a.name for a in node.names)))
        elif isinstance(node, ast.Import):
            found += [(a.name.split(".")[1], ()) for a in node.names
                      if a.name.startswith("regext.")]
    return [(m, names) for m, names in found if m != "_C"]


def test_every_module_has_a_layer():
    assert sorted(set(modules()) - set(RANK)) == []


@pytest.mark.parametrize("name", modules())
def test_imports_point_downward(name):
    for target, _ in imports_of(name):
        assert RANK[target] < RANK[name], f"{name} imports {target}, which is not below it"


@pytest.mark.parametrize("name", modules())
def test_no_underscored_names_from_other_modules(name):
    for target, names in imports_of(name):
        private = [n for n in names if n.startswith("_")]
        assert not private, f"{name} imports {private} from {target}"


def test_the_graph_has_no_cycle():
    graph = {name: {t for t, _ in imports_of(name)} for name in modules()}
    state = {}

    def visit(node, path):
        assert state.get(node) != "open", f"import cycle: {' -> '.join(path + [node])}"
        if state.get(node) == "done":
            return
        state[node] = "open"
        for nxt in graph.get(node, ()):
            visit(nxt, path + [node])
        state[node] = "done"

    for name in graph:
        visit(name, [])
