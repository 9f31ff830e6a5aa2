import pytest

import strategies
from clients import losses
from models import registry as model_registry
from models.cnn import CNNOptions


def test_model_registry_rejects_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        model_registry.register("cnn", options=CNNOptions)(lambda cfg, spec: None)
    with pytest.raises(KeyError, match="valid models: cnn"):
        model_registry.get("resnet")


def test_strategy_registry_rejects_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        strategies.register("eefl")(type("X", (), {}))
    with pytest.raises(KeyError, match="valid strategies: "):
        strategies.get("fedavg")


def test_objective_registry_lists_names():
    with pytest.raises(KeyError, match="valid objectives: "):
        losses.get("nope")
