"""The run config: defaults in one place, every key typed and checked, errors that name the
key and the valid choices."""
import dataclasses
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

import strategies
from fedeen.app_config import check_run, default_run_config, load_config
from fedeen.config import ConfigError, RunConfig, core_fields
from models import registry as model_registry
from models.options import key_for

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fedeen", "models", "strategies", "clients", "simulations")


def test_pyproject_defaults_equal_config_defaults():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == default_run_config() == load_config({}).as_run_config()


def test_empty_run_config_gives_defaults():
    cfg = load_config({})
    assert all(getattr(cfg, f.name) == f.default for f in core_fields())
    assert all(obj == type(obj)() for obj in cfg.options)


def count_after(imports: str) -> str:
    code = (f"{imports}; import fedeen.config as c; import fedeen.app_config as a; "
            "print(len(c.RunConfig().as_run_config()), len(a.default_run_config()))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, check=True).stdout.strip()


def test_the_config_is_the_same_whatever_was_imported_first():
    first = count_after("import os")
    assert first == count_after("import strategies, clients.losses, fedeen.server_app, "
                                "fedeen.client_app, simulations.run_grid")
    core, full = map(int, first.split())
    assert full == len(default_run_config()) > core


def project_files() -> dict[Path, str]:
    return {p: p.read_text() for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def test_every_key_is_read_through_its_field():
    """The one rule: key = <prefix>-<field name, '_' as '-'>. A search for the field name (as
    an attribute) in the modules that name the option group finds where each value is used."""
    files = project_files()
    groups = {nested for g in [*model_registry.option_classes(), *strategies.option_classes()]
              for nested in g.groups()}
    keys = {key_for("", f.name) for f in core_fields()}
    unused = [key_for("", f.name) for f in core_fields()
              if not re.search(rf"\.{f.name}\b", "\n".join(files.values()))]
    for g in groups:
        users = "\n".join(text for text in files.values() if re.search(rf"\b{g.__name__}\b", text))
        for f in dataclasses.fields(g):
            if f.metadata.get("group"):
                continue
            keys.add(key_for(g.prefix, f.name))
            if not re.search(rf"\.{f.name}\b", users):
                unused.append(key_for(g.prefix, f.name))
    assert keys == set(default_run_config())
    assert not unused, f"keys whose field is never read: {unused}"


@pytest.mark.parametrize("overrides, needle", [
    ({"strategy": "fedprox"}, "valid strategies: "),
    ({"model": "resnet50"}, "valid models: cnn"),
    ({"dataset": "imagenet"}, "valid datasets: cifar10"),
    ({"dataset": "/nonexistent/cifar10"}, "does not exist"),
    ({"dataset": "../shared/data/cifar10"}, "must be absolute"),
    ({"partitioner": "shards"}, "valid partitioners: iid, dirichlet, natural"),
    ({"alpha": 0.0}, "alpha"),
    ({"alpha": "high"}, "must be a float"),
    ({"lr": float("inf")}, "lr = inf must be a finite number"),
    ({"seed": -1}, "seed = -1 must be >= 0"),
    ({"budget-ratios": "0.5,0.6"}, "sum to 1"),
    ({"budget-ratios": "a,b"}, "comma-separated"),
    ({"no-such-key": 1}, "valid keys: "),
    ({"out-dir": "relative/dir"}, "absolute"),
    ({"augment-hflip": "sometimes"}, "augment-hflip 'sometimes'; valid values: auto, true, false"),
    ({"model": "vit", "vit-patch": 5}, "not divisible by patch size 5"),
    ({"model": "vit", "vit-dim": 100}, "vit-dim = 100 must be divisible by vit-heads = 3"),
    ({"cnn-width": 0}, "cnn-width = 0 must be >= 1"),
    ({"budget-ratios": "0.2,0.2,0.2,0.2,0.2"}, "at most 4 exits"),
    ({"strategy": "scalefl", "scalefl-widths": "0.4,0.55,0.75,0.9"}, "must be 1.0"),
    ({"strategy": "darkdistill", "darkdistill-weighting": "fuzzy"}, "valid: soft, hard"),
    ({"strategy": "darkdistill", "darkdistill-kd-lr": -1}, "darkdistill-kd-lr = -1.0 must be > 0"),
    ({"strategy": "inclusivefl", "inclusivefl-beta": 2}, "inclusivefl-beta = 2.0 must be in"),
])
def test_bad_values_name_the_problem(overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    assert needle in str(err.value)


def test_a_vit_can_carry_more_levels_than_the_cnn():
    cfg = load_config({"budget-ratios": "0.2,0.2,0.2,0.2,0.2", "model": "vit", "vit-blocks": 5})
    assert cfg.num_levels == 5


def test_unknown_strategy_lists_every_registered_name():
    with pytest.raises(ConfigError) as err:
        load_config({"strategy": "nope"})
    for name in strategies.available():
        assert name in str(err.value)


def test_int_given_for_float_is_accepted():
    assert load_config({"alpha": 1}).alpha == 1.0


def test_options_are_typed_fields():
    from strategies.darkdistill import DarkDistillOptions

    cfg = load_config({"strategy": "darkdistill", "darkdistill-kd-lr": 0.1,
                       "darkdistill-server-epochs": 3})
    options = cfg.options_of(DarkDistillOptions)
    assert options.shared.kd_lr == 0.1 and options.server_epochs == 3
    assert cfg.as_run_config()["darkdistill-kd-lr"] == 0.1
    assert RunConfig().options_of(model_registry.get("vit").options).dim == 192


def one_class_npz(tmp_path):
    path = tmp_path / "one-class" / "data.npz"
    path.parent.mkdir()
    np.savez(path, images=np.zeros((30, 1, 8, 8), np.uint8), labels=np.zeros(30, np.int64))
    return str(path.parent)


def text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("not a dataset\n")
    return str(path)


def unwritable(tmp_path):
    return "/proc/fedeen-runs"  # no one may create folders in /proc, root included


#: (run config or a function of tmp_path giving extra keys, nodes, words of the error)
RUN_CASES = {
    "exit-p inf": ({"exit-p": float("inf")}, None, "exit-p = inf must be a finite number"),
    "weight-decay inf": ({"weight-decay": float("inf")}, None, "finite"),
    "lr inf": ({"lr": float("inf")}, None, "finite"),
    "seed -1": ({"seed": -1}, None, "seed = -1"),
    "cuda without a GPU": ({"device": "cuda"}, None, "no CUDA device"),
    "one class": (lambda t: {"dataset": one_class_npz(t)}, 4, "1 class"),
    "not a dataset": (lambda t: {"dataset": text_file(t)}, 4, "cannot be read as a dataset"),
    "out-dir not writable": (lambda t: {"out-dir": unwritable(t)}, 4, "not writable"),
    "more nodes than samples (iid)": ({"partitioner": "iid"}, 5000, "needs at least 5000"),
    "more nodes than samples (dirichlet)": ({}, 1000, "needs at least 2000"),
    "natural column missing": ({"partitioner": "natural", "natural-id": "writer"}, 4,
                               "natural-id column 'writer'"),
    "min-nodes above the federation": ({"min-nodes": 9}, 4, "min-nodes = 9"),
}


@pytest.mark.parametrize("case", RUN_CASES)
def test_a_run_that_would_fail_later_fails_before_training(case, tmp_path):
    rc, nodes, needle = RUN_CASES[case]
    rc = rc(tmp_path) if callable(rc) else rc
    if "cuda" in case and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError) as err:
        check_run(load_config({**rc}), nodes)
    assert needle in str(err.value)
