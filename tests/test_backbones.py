"""The contract every registered backbone meets (as timm tests every registered model): all
exits come out, submodels of any depth and width are leading slices of the global state that
scatter back unchanged, names follow the embed/blocks/exits scheme, and the boosted policy
rescales each exit's gradient into the backbone."""
import numpy as np
import pytest
import torch

from models import EENFamily, ModelConfig, SubmodelSpec
from models import registry as model_registry
from models.state import load_state
from models.submodel import scatter_mean, slice_state

FAMILIES = model_registry.available()
SPECS = [SubmodelSpec(1), SubmodelSpec(3), SubmodelSpec(2, 0.5), SubmodelSpec(4, 0.75)]


def family(name: str, **changes) -> EENFamily:
    """The family at its default backbone options, on small 16x16 inputs."""
    return EENFamily(name, ModelConfig(num_classes=5, in_chans=3, image_size=16, **changes))


@pytest.mark.parametrize("name", FAMILIES)
def test_every_exit_returns_logits_and_features_and_deeper_exits_cost_more(name):
    fam = family(name)
    out = fam.build()(fam.example_input(2))
    assert len(out.logits) == len(out.features) == fam.num_exits == 4
    assert all(z.shape == (2, 5) for z in out.logits)
    costs = fam.exit_costs()
    assert all(a < b for a, b in zip(costs, costs[1:]))


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_a_slice_loads_into_its_submodel_and_scatters_back_unchanged(name, spec):
    fam = family(name)
    g = fam.init_state(0)
    sub = slice_state(g, fam.shapes(spec))
    model = load_state(fam.build(spec), sub)  # strict: names and shapes match
    out = model(fam.example_input(2))
    assert len(out.logits) == spec.depth and len(out.features) == spec.depth
    back = scatter_mean(g, [(sub, 3.0)])
    for k in g:
        np.testing.assert_array_equal(back[k], g[k])
    # depth picks names: a depth-d submodel holds exactly the tensors of segments <= d
    assert {fam.segment_of(k) for k in sub} == set(range(1, spec.depth + 1))


@pytest.mark.parametrize("name", FAMILIES)
def test_width_slices_are_leading_and_narrower(name):
    fam = family(name)
    full, half = fam.shapes(SubmodelSpec(4)), fam.shapes(SubmodelSpec(4, 0.5))
    assert full.keys() == half.keys()
    assert all(len(half[k]) == len(full[k]) and all(h <= f for h, f in zip(half[k], full[k]))
               for k in full)
    narrower = [k for k in full if half[k] != full[k]]
    assert any(k.startswith("blocks.") for k in narrower)


@pytest.mark.parametrize("name", FAMILIES)
def test_tensor_names_follow_the_embed_blocks_exits_scheme(name):
    fam = family(name)
    for key in fam.shapes():
        top = key.split(".")[0]
        assert top in ("embed", "blocks", "exits", "ree"), key
        if top in ("blocks", "exits"):
            assert key.split(".")[1].isdigit(), key


def block_grads(name: str, policy: str, exit_j: int, state: dict | None) -> tuple[list, dict]:
    net = family(name, policy=policy).build(SubmodelSpec(4, 1.0))
    if state is not None:
        net.load_state_dict(state)
    net.eval()  # same forward in both policies (no BatchNorm batch statistics)
    torch.manual_seed(0)
    x, w = torch.randn(6, 3, 16, 16), torch.randn(6, 5)
    # linear in the exit's logits, so the frozen ensemble added under "boosted" does not
    # change the gradient arriving at the exit: only the rescaling does
    (net(x).logits[exit_j - 1] * w).sum().backward()
    exit_blocks = [net.exit_after[0], net.exit_after[1]]  # 1-based last block of segments 1, 2
    grads = [torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten()
                        for p in net.blocks[b - 1].parameters()]) for b in exit_blocks]
    return grads, net.state_dict()


@pytest.mark.parametrize("name", FAMILIES)
def test_boosted_rescales_each_exits_gradient_into_the_backbone(name):
    """m = 4 exits: exit 1 reaches its block with 1/4 of its gradient; exit 2 reaches its
    block with 1/3 and exit 1's block with 1/3 * 3/4 = 1/4 (BoostNet's rescaling)."""
    if not hasattr(family(name).build(), "exits"):
        pytest.skip("a shared exit reads every block's CLS token, so exit 2's gradient also "
                    "reaches exit 1's block outside the rescaled backbone path")
    base1, state = block_grads(name, "base", 1, None)
    boost1, _ = block_grads(name, "boosted", 1, state)
    torch.testing.assert_close(boost1[0], base1[0] / 4)
    base2, _ = block_grads(name, "base", 2, state)
    boost2, _ = block_grads(name, "boosted", 2, state)
    torch.testing.assert_close(boost2[1], base2[1] / 3)
    torch.testing.assert_close(boost2[0], base2[0] / 4)
