import pytest

import strategies
from clients import losses
from models import EENFamily, ModelConfig
from models import registry as model_registry


def test_model_registry_rejects_duplicates_and_unknown_names():
    with pytest.raises(ValueError, match="already registered"):
        model_registry.register("cnn")(lambda cfg, spec: None)
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


@pytest.mark.parametrize("name", model_registry.available())
def test_every_registered_model_returns_all_exits(name):
    cfg = ModelConfig(num_classes=7, in_chans=3, image_size=16, cnn_width=4, vit_blocks=4,
                      vit_dim=32, vit_heads=2)
    fam = EENFamily(name, cfg)
    out = fam.build()(fam.example_input(2))
    assert len(out.logits) == len(out.features) == 4
    assert all(z.shape == (2, 7) for z in out.logits)
    costs = fam.exit_costs()
    assert all(a < b for a, b in zip(costs, costs[1:]))
