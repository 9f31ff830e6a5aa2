import tomllib
from pathlib import Path

import pytest

from fedeen.config import ConfigError, RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_pyproject_defaults_equal_config_defaults():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == load_config({}).as_run_config()


def test_empty_run_config_gives_defaults():
    assert load_config({}) == RunConfig()


@pytest.mark.parametrize("overrides, needle", [
    ({"strategy": "fedprox"}, "valid strategies: "),
    ({"model": "resnet50"}, "valid models: cnn"),
    ({"dataset": "imagenet"}, "valid datasets: cifar10"),
    ({"dataset": "/nonexistent/cifar10"}, "does not exist"),
    ({"dataset": "../shared/data/cifar10"}, "must be absolute"),
    ({"partitioner": "shards"}, "valid partitioners: iid, dirichlet, natural"),
    ({"alpha": 0.0}, "alpha"),
    ({"alpha": "high"}, "must be a float"),
    ({"budget-ratios": "0.5,0.6"}, "sum to 1"),
    ({"budget-ratios": "a,b"}, "comma-separated"),
    ({"no-such-key": 1}, "valid keys: "),
    ({"out-dir": "relative/dir"}, "absolute"),
    ({"vit-patch": 5}, "vit-patch"),
])
def test_bad_values_name_the_problem(overrides, needle):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(overrides)
    assert needle in str(err.value)


def test_unknown_strategy_lists_every_registered_name():
    import strategies

    with pytest.raises(ConfigError) as err:
        load_config({"strategy": "nope"})
    for name in strategies.available():
        assert name in str(err.value)


def test_int_given_for_float_is_accepted():
    assert load_config({"alpha": 1}).alpha == 1.0
