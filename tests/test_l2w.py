"""The L2W policy: per-sample exit weights in every objective, the meta-network's second-order
update, its slicing across levels and its aggregation with the model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clients import l2w, losses
from models import EENFamily, ModelConfig, SubmodelSpec

from inprocess import InProcessGrid, instructions, make_strategy, train_round


def family(depth_exits: int = 4) -> EENFamily:
    return EENFamily("cnn", ModelConfig(num_classes=10, policy="l2w", num_exits=depth_exits))


def batch(n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_meta_network_is_sliced_by_level_and_weights_average_one():
    fam = family()
    assert fam.shapes(SubmodelSpec(2))["meta.hidden.weight"] == (500, 2)
    assert fam.shapes(SubmodelSpec(2))["meta.out.weight"] == (2, 500)
    assert fam.shapes()["meta.out.weight"] == (4, 500)
    model = fam.build()
    x, y = batch()
    w = l2w.sample_weights(model, model(x).logits, y)
    assert w.shape == (16, 4)
    torch.testing.assert_close(w.mean(dim=1), torch.ones(16))


def test_every_objective_reads_the_weights():
    torch.manual_seed(0)
    model = family().build()
    x, y = batch()
    out = model(x)
    ctx = losses.ObjectiveContext(instructions({"depth": 4, "kd-gamma": 0.5,
                                                "kd-temperature": 3.0}), {}, model, {})
    for name in ("sum_ce", "last_exit_ce", "depthfl", "scalefl"):
        objective = losses.get(name)
        out.sample_weights = None
        plain = objective(out, y, ctx)
        out.sample_weights = torch.ones(16, 4)
        torch.testing.assert_close(objective(out, y, ctx), plain)
        out.sample_weights = torch.zeros(16, 4)
        assert objective(out, y, ctx) < plain, name  # the label terms vanish


def test_meta_step_moves_only_the_meta_network_through_the_virtual_step():
    torch.manual_seed(0)
    model = family().build().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-4)
    meta_opt = l2w.meta_optimizer(model)
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x, y = batch(32)
    loss = l2w.meta_step(model, x, y, opt, meta_opt)
    assert np.isfinite(loss)
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("meta.") for k in moved), sorted(moved)[:5]


def test_l2w_meta_network_trains_and_is_averaged_in_a_federated_round():
    rc = {"strategy": "depthfl", "max-samples-per-client": 60, "policy": "l2w",
          "local-epochs": 1}
    strategy = make_strategy(rc)
    before = {k: v.copy() for k, v in strategy.global_state.items() if k.startswith("meta.")}
    assert before
    _, (_, metrics) = train_round(strategy, InProcessGrid(rc, 4))
    assert metrics["clients-failed"] == 0
    after = strategy.global_state
    assert any(not np.array_equal(after[k], before[k]) for k in before)
