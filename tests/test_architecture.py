"""Dependencies point one way: models <- fedeen core <- strategies, clients <- the apps <-
simulations; and no module imports inside a function to dodge a cycle."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
APPS = {"fedeen.server_app", "fedeen.client_app", "fedeen.app_config"}
LAYER = {"models": 0, "fedeen": 1, "strategies": 2, "clients": 2, "apps": 3, "simulations": 4}
#: function-level imports that stay, with the reason (none of them dodges a cycle)
DEFERRED_OK = {
    ("fedeen/data/sources.py", "datasets"): "datasets is slow to import; only loaders need it",
    ("fedeen/data/sources.py", "sklearn.datasets"): "only the digits loader needs scikit-learn",
    ("fedeen/data/partition.py", "flwr_datasets.partitioner"): "only partitioning needs it",
    ("fedeen/results.py", "matplotlib"): "the Agg backend must be chosen before pyplot loads",
    ("fedeen/results.py", "matplotlib.pyplot"): "the Agg backend must be chosen before pyplot",
    ("models/base.py", "torch.utils.flop_counter"): "only FLOP counting needs it",
    ("simulations/flwr_local.py", "argparse"): "standard library, only the CLI uses it",
}


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def layer(module: str) -> str | None:
    top = module.split(".")[0]
    if top not in LAYER:
        return None
    if top == "fedeen" and (module in APPS or any(module.startswith(a + ".") for a in APPS)):
        return "apps"
    return top


def sources():
    for pkg in ("models", "fedeen", "strategies", "clients", "simulations"):
        yield from sorted((ROOT / pkg).rglob("*.py"))


def imports(tree: ast.AST):
    """(imported module, inside a function?) for every import statement."""
    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield alias.name, in_function
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                yield child.module, in_function
            else:
                yield from visit(child, inside)
    yield from visit(tree, False)


@pytest.mark.parametrize("path", list(sources()), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down_the_layers(path):
    own = layer(module_name(path))
    for target, _ in imports(ast.parse(path.read_text())):
        other = layer(target)
        if other is None or own is None:
            continue
        assert LAYER[other] <= LAYER[own], f"{module_name(path)} ({own}) imports {target} ({other})"
        if {own, other} == {"strategies", "clients"}:
            pytest.fail(f"{module_name(path)} imports {target}: strategies and clients are peers")


@pytest.mark.parametrize("path", list(sources()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_import_inside_a_function_without_a_stated_reason(path):
    rel = str(path.relative_to(ROOT))
    for target, in_function in imports(ast.parse(path.read_text())):
        if in_function:
            assert (rel, target) in DEFERRED_OK, f"{rel} imports {target} inside a function"
