"""The boosted (BoostNet) training policy: additive exits and gradient rescaling."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from inprocess import InProcessGrid
from fedeen.app_config import load_config
from fedeen.config import ConfigError
from fedeen.server_app import run
from models.base import POLICIES, boosted_logits, grad_scale

SMALL = {"num-server-rounds": 1, "max-test-samples": 100, "max-samples-per-client": 64,
         "image-size": 16, "policy": "boosted"}
VIT = {"model": "vit", "vit-blocks": 4, "vit-dim": 32, "vit-heads": 2, "vit-patch": 4}


def test_boosted_logits_on_a_hand_made_case():
    z = [torch.tensor([[1.0, 0.0]], requires_grad=True), torch.tensor([[0.0, 2.0]], requires_grad=True),
         torch.tensor([[1.0, 1.0]], requires_grad=True)]
    out = boosted_logits(z, 0.2)
    # e1 = 0.2 z1 = [.2, 0]; e2 = 0.2 (z2 + e1) = [.04, .4]
    torch.testing.assert_close(out[0], torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(out[1], torch.tensor([[0.2, 2.0]]))
    torch.testing.assert_close(out[2], torch.tensor([[1.04, 1.4]]))
    out[2].sum().backward()  # the ensemble of shallower exits is frozen
    assert z[0].grad is None and z[1].grad is None
    torch.testing.assert_close(z[2].grad, torch.ones(1, 2))


def test_grad_scale_is_identity_forward_and_scales_backward():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = grad_scale(x, 0.25)
    torch.testing.assert_close(y, x.detach())
    (3 * y).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((2,), 0.75))


def test_unknown_policy_names_the_valid_ones():
    with pytest.raises(ConfigError, match="unknown policy 'l3w'; valid policies: base, boosted"):
        load_config({"policy": "l3w"})


@pytest.mark.parametrize("rc", [{"strategy": "darkdistill"}, {"strategy": "reffl", **VIT},
                                {"strategy": "depthfl"}], ids=["darkdistill", "reffl", "depthfl"])
def test_strategies_train_under_the_boosted_policy(rc, out_dir):
    rc = {**SMALL, **rc, "out-dir": out_dir}
    summary = run(InProcessGrid(rc, 4), load_config(rc))
    train = summary["rounds"][0]["train"]
    assert train["clients-ok"] == 4 and train["clients-failed"] == 0
    assert all(math.isfinite(summary["final"][f"acc-exit-{j}"]) for j in range(1, 5))


def test_the_policy_reaches_client_training(tmp_path):
    """Same seed, same data: only the policy differs, so the trained global models must too
    (a policy that never reached the clients' models would leave them bit-identical)."""
    models = {}
    for policy in POLICIES:
        rc = {**SMALL, "policy": policy, "out-dir": str(tmp_path / policy)}
        summary = run(InProcessGrid(rc, 4), load_config(rc))
        models[policy] = torch.load(Path(summary["run_dir"]) / "final_model.pt", weights_only=True)
    base, boosted = models["base"], models["boosted"]
    assert any(not torch.equal(base[k], boosted[k]) for k in base if k.startswith("blocks."))
