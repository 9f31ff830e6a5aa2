"""The five baselines (ExclusiveFL, InclusiveFL, DepthFL, ScaleFL, ReeFL): each one's
distinctive mechanism against hand-computed numbers, then one in-process round of each."""
import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from torch.nn import functional as F

from clients import losses
from clients.losses import ObjectiveContext
from inprocess import InProcessGrid, instructions, make_strategy
from fedeen.app_config import load_config
from fedeen.config import ConfigError
from fedeen.server_app import run
from models.base import EEOutput
from fedeen.protocol import to_record
from strategies.base import ClientUpdate
from strategies.depthfl import ensemble_accuracy, feddyn_server_update

TINY_VIT = {"model": "vit", "vit-blocks": 4, "vit-dim": 32, "vit-heads": 2, "image-size": 16,
            "vit-patch": 4}



def const_state(strategy, level, value, **per_prefix):
    """Level ``level``'s tensors filled with ``value``; ``blocks_2_=4.0`` sets the tensors whose
    names start with ``blocks.2.`` (underscores stand for dots)."""
    out = {}
    for k, shape in strategy.family.shapes(strategy.level_spec(level)).items():
        dtype = strategy.global_state[k].dtype
        v = next((pv for p, pv in per_prefix.items() if k.startswith(p.replace("_", "."))), value)
        out[k] = np.full(shape, v, dtype=dtype)
    return out


def update(strategy, level, state, n):
    return ClientUpdate(1000 + level, level, strategy.level_spec(level), state, n, {})


def zero_global(strategy):
    strategy.initialize({k: np.zeros_like(v) for k, v in strategy.global_state.items()})


# ---------------------------------------------------------------------- ExclusiveFL
def test_exclusivefl_sends_only_to_full_model_nodes(out_dir):
    rc = {"strategy": "exclusivefl", "fraction-train": 0.25, "out-dir": out_dir}
    grid = InProcessGrid(rc, 8)
    strategy = make_strategy(rc)
    msgs = list(strategy.configure_train(1, to_record(strategy.global_state), ConfigRecord(), grid))
    # as many clients as 25% of all nodes would give, all of them level K (2 of 8 nodes)
    assert len(msgs) == 2
    assert {strategy.nodes.levels[m.metadata.dst_node_id] for m in msgs} == {4}
    assert all(m.content["config"]["objective"] == "sum_ce" for m in msgs)


# ---------------------------------------------------------------------- InclusiveFL
INCL = {"strategy": "inclusivefl", "model": "vit", "vit-blocks": 8, "vit-dim": 4,
        "vit-heads": 1, "image-size": 8, "vit-patch": 4}


def incl_round(opt):
    s = make_strategy({**INCL, "inclusivefl-server-opt": opt})
    zero_global(s)
    assert s.family.exit_after == [2, 4, 6, 8]
    # level 1 (blocks 0-1, top block 1): every tensor -> 1, so Delta^(1) = -1
    # level 2 (blocks 0-3, adds 2-3): 2, with blocks 2 and 3 at 4 and 6
    ups = [update(s, 1, const_state(s, 1, 1.0), 30),
           update(s, 2, const_state(s, 2, 2.0, blocks_2_=4.0, blocks_3_=6.0), 10)]
    return s, s.aggregate(1, ups)


def test_inclusivefl_momentum_distillation_and_group_specific_top_block_sgd():
    s, new = incl_round("sgd")
    beta = 0.2
    # level 1's own top block: Delta = beta * mean(Delta_2, Delta_3 of level 2) + (1-beta) * -1
    top = 0.0 - (beta * np.mean([-4.0, -6.0]) + (1 - beta) * -1.0)  # = 1.8
    key = "blocks.1.attn.q.weight"
    np.testing.assert_allclose(s.private[1][key], top, rtol=1e-6)
    np.testing.assert_allclose(s.arrays_for(0, 1)[key], top, rtol=1e-6)
    # the global copy of block 1 is level 2's (the only deeper level this round)
    np.testing.assert_allclose(new[key], 2.0)
    # shared lower tensors: averaged over levels by group sample counts
    np.testing.assert_allclose(new["blocks.0.mlp.fc1.weight"], (30 * 1 + 10 * 2) / 40)
    np.testing.assert_allclose(new["embed.pos"], 1.25)
    # each exit head comes from the level whose last exit it is
    np.testing.assert_allclose(new["exits.0.fc.weight"], 1.0)
    np.testing.assert_allclose(new["exits.1.fc.weight"], 2.0)
    np.testing.assert_allclose(new["blocks.2.attn.v.bias"], 4.0)
    # block 3 is level 2's top block: private to it; no deeper level updated the global copy
    np.testing.assert_array_equal(new["blocks.3.attn.v.bias"], 0.0)
    np.testing.assert_array_equal(new["blocks.4.attn.v.bias"], 0.0)  # held by nobody
    # level 2 had no deeper level this round: plain average on its top block
    np.testing.assert_allclose(s.private[2]["blocks.3.norm1.weight"], 6.0)


def test_inclusivefl_fedadam_on_the_pseudo_gradient():
    s, new = incl_round("adam")

    def adam_step(d):  # one FedAdam step from zero moments, theta_old = 0
        return -1e-3 * (0.1 * d) / (math.sqrt(0.001 * d * d) + 1e-6)

    np.testing.assert_allclose(s.private[1]["blocks.1.mlp.fc2.weight"], adam_step(-1.8), rtol=1e-5)
    np.testing.assert_allclose(new["blocks.0.mlp.fc2.weight"],
                               (30 * adam_step(-1.0) + 10 * adam_step(-2.0)) / 40, rtol=1e-5)
    assert set(s.state_dict()["adam_m"]) == {1, 2}


def test_inclusivefl_cnn_momentum_uses_same_stage_of_next_level():
    s = make_strategy({"strategy": "inclusivefl", "model": "cnn"})
    zero_global(s)
    ints = {k: 3 for k in s.global_state if s.global_state[k].dtype.kind == "i"}
    l1 = const_state(s, 1, 1.0)
    l1.update({k: np.full_like(v, 3) for k, v in l1.items() if k in ints})
    s.aggregate(1, [update(s, 1, l1, 10), update(s, 2, const_state(s, 2, 2.0), 10)])
    # stage 1 of level 2 has other shapes: M_1 falls back to level 2's Delta of stage 0
    np.testing.assert_allclose(s.private[1]["blocks.0.0.conv1.weight"], -(0.2 * -2 + 0.8 * -1))
    np.testing.assert_allclose(s.private[1]["blocks.0.0.bn1.running_mean"], 1.0)  # buffer: average
    assert s.private[1]["blocks.0.0.bn1.num_batches_tracked"] == 3


# ---------------------------------------------------------------------- ScaleFL
def test_scalefl_elementwise_width_aggregation_with_batchnorm():
    s = make_strategy({"strategy": "scalefl", "model": "cnn", "scalefl-widths": "0.5,1,1,1"})
    zero_global(s)
    half = const_state(s, 1, 1.0)
    half["embed.1.num_batches_tracked"] = np.array(5)
    assert half["embed.0.weight"].shape[0] == 8 == s.global_state["embed.0.weight"].shape[0] // 2
    assert s.arrays_for(0, 1)["embed.1.running_var"].shape == (8,)
    full = const_state(s, 2, 3.0)
    full["embed.1.num_batches_tracked"] = np.array(10)
    new = s.aggregate(1, [update(s, 1, half, 10), update(s, 2, full, 30)])
    for key in ("embed.0.weight", "embed.1.running_mean", "embed.1.running_var"):
        np.testing.assert_allclose(new[key][:8], (10 * 1 + 30 * 3) / 40)  # both hold it
        np.testing.assert_allclose(new[key][8:], 3.0)  # only the full-width client
    assert new["embed.1.num_batches_tracked"] == 9  # rint(8.75)
    np.testing.assert_allclose(new["blocks.1.0.bn2.running_mean"], 3.0)
    np.testing.assert_array_equal(new["blocks.2.0.bn2.running_mean"], 0.0)


def kl(teacher, student, t):
    p = F.softmax(teacher / t, 1)
    return float((p * (p.log() - F.log_softmax(student / t, 1))).sum(1).mean()) * t * t


def random_outputs(k, n=6, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return EEOutput([torch.randn(n, c, generator=g) * 2 for _ in range(k)], []), \
        torch.randint(0, c, (n,), generator=g)


def test_scalefl_loss_and_kd_schedule():
    out, y = random_outputs(3)
    z, ce = out.logits, [float(F.cross_entropy(z_, y)) for z_ in out.logits]
    g, t = 0.05, 3.0
    expected = (1 * (ce[0] + g * kl(z[2], z[0], t)) + 2 * (ce[1] + g * kl(z[2], z[1], t))
                + 3 * ce[2]) / 6
    ctx = ObjectiveContext(instructions({"kd-gamma": g, "kd-temperature": t}))
    assert float(losses.get("scalefl")(out, y, ctx)) == pytest.approx(expected, rel=1e-5)
    s = make_strategy({"strategy": "scalefl", "num-server-rounds": 4})
    assert [s.instructions(r, 1).kd_gamma for r in (1, 2)] == [0.0, 0.05]
    assert s.level_spec(1).width == 0.4 and s.level_spec(4).width == 1.0
    with pytest.raises(ConfigError, match="one ratio per budget level"):
        load_config({"strategy": "scalefl", "scalefl-widths": "0.5,1"})
    # the DarkDistill authors' normaliser k(k+1): half the official loss
    authors = make_strategy({"strategy": "scalefl", "scalefl-loss-norm": "k(k+1)"})
    assert s.instructions(1, 2).objective == "scalefl"
    objective = authors.instructions(1, 2).objective
    assert float(losses.get(objective)(out, y, ctx)) == pytest.approx(expected / 2, rel=1e-5)


def test_scalefl_vit_width_scales_residual_and_mlp_widths_keeping_heads():
    """The DarkDistill authors' ViT sizing: hidden and MLP widths times the ratio, rounded
    down to a multiple of the head count; the head count kept."""
    s = make_strategy({"strategy": "scalefl", **TINY_VIT, "vit-dim": 64,
                       "scalefl-widths": "0.75,0.857,0.9,1.0"})
    for level, dim, mlp in [(1, 48, 192), (2, 54, 218), (3, 56, 230), (4, 64, 256)]:
        model = s.family.build(s.level_spec(level))
        assert model.dim == dim and model.embed.cls.shape[-1] == dim
        block = model.blocks[0]
        assert block.attn.heads == 2 and block.attn.q.weight.shape == (dim, dim)
        assert block.mlp.fc1.weight.shape == (mlp, dim)
        assert model.exits[0].fc.weight.shape[1] == dim


def test_inclusivefl_exit_training_and_evaluation_options():
    """Last exit only (the paper) or every exit (the DarkDistill authors); exits scored on
    the level models or on the global model."""
    paper = make_strategy({"strategy": "inclusivefl", **TINY_VIT})
    assert paper.instructions(1, 3).objective == "last_exit_ce"
    assert sorted(paper.exit_states()) == [1, 2, 3]
    out, y = random_outputs(3)
    heads = [z.detach().requires_grad_() for z in out.logits]
    losses.get("last_exit_ce")(EEOutput(heads, out.features), y, None).backward()
    assert heads[0].grad is None and heads[1].grad is None and heads[2].grad.abs().sum() > 0
    assert not any(k.startswith("exits.0.") for k in paper.shared_keys(3))
    authors = make_strategy({"strategy": "inclusivefl", **TINY_VIT,
                             "inclusivefl-train-exits": "all", "inclusivefl-evaluate-on": "global"})
    assert authors.instructions(1, 3).objective == "sum_ce"
    assert authors.exit_states() == {}
    # every exit trained: a level shares the smaller levels' exit heads, keeps its own
    assert any(k.startswith("exits.0.") for k in authors.shared_keys(3))
    assert any(k.startswith("exits.2.") for k in authors.private_keys(3))
    assert not any(k.startswith("exits.2.") for k in authors.shared_keys(3))


# ---------------------------------------------------------------------- DepthFL
def test_depthfl_loss_and_ramp():
    assert losses.consistency_ramp(0, 300) == pytest.approx(math.exp(-5))
    assert losses.consistency_ramp(150, 300) == pytest.approx(math.exp(-1.25))
    assert losses.consistency_ramp(900, 300) == 1.0 and losses.consistency_ramp(3, 0) == 1.0
    out, y = random_outputs(3, seed=1)
    z, t, lam = out.logits, 1.0, math.exp(-1.25)
    expected = sum(float(F.cross_entropy(zi, y)) + lam / 2 * sum(kl(zj, zi, t) for j, zj in
                   enumerate(z) if j != i) for i, zi in enumerate(z))
    ctx = ObjectiveContext(instructions({"server-round": 150, "kd-rampup-rounds": 300, "kd-temperature": t}))
    assert float(losses.get("depthfl")(out, y, ctx)) == pytest.approx(expected, rel=1e-5)
    one = EEOutput(z[:1], [])
    assert float(losses.get("depthfl")(one, y, ctx)) == pytest.approx(float(F.cross_entropy(z[0], y)))


def test_depthfl_feddyn_client_and_server():
    model = torch.nn.Linear(2, 1)
    received = {k: v.detach().clone() for k, v in model.named_parameters()}
    state: dict = {}
    ctx = ObjectiveContext(instructions({}), state, model, received)
    assert losses.feddyn_penalty(ctx, 0.1).item() == pytest.approx(0.0)
    with torch.no_grad():
        model.weight += 1.0  # "training" moved every weight by 1
    model.state_dict()  # the client reads its model out: g <- g - alpha (theta - theta_global)
    np.testing.assert_allclose(state["feddyn-g.weight"], -0.1)
    np.testing.assert_allclose(state["feddyn-g.bias"], 0.0)
    # next round: -<theta, g> + alpha/2 ||theta - theta_global||^2
    model2 = torch.nn.Linear(2, 1)  # the client builds a fresh model every round
    model2.load_state_dict(model.state_dict())
    ctx2 = ObjectiveContext(instructions({}), state, model2, {k: v.detach().clone() - 1.0 for k, v in
                                                model2.named_parameters()})
    expected = (0.1 * model2.weight.sum() + 0.05 * 2 + 0.05 * 1).item()
    assert losses.feddyn_penalty(ctx2, 0.1).item() == pytest.approx(expected, rel=1e-5)
    # server: h <- h - alpha (m/N)(mean - old); theta = mean - h/alpha where held
    h: dict = {}
    old, mean = {"w": np.zeros(3, np.float32)}, {"w": np.array([1.0, 2.0, 0.0], np.float32)}
    counts = {"w": np.array([2.0, 1.0, 0.0])}
    new = feddyn_server_update(h, old, mean, counts, {"w"}, alpha=0.1, num_clients=4)
    np.testing.assert_allclose(h["w"], [-0.1 * 0.5 * 1, -0.1 * 0.25 * 2, 0.0])
    np.testing.assert_allclose(new["w"], [1 + 0.5, 2 + 0.5, 0.0], rtol=1e-6)


def test_ensemble_accuracy():
    y = torch.tensor([1, 1])
    logits = [torch.tensor([[2.0, 0.0], [2.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 3.0]])]
    assert ensemble_accuracy(logits, y) == 0.5  # means [[1, .5], [1, 1.5]]
    s = make_strategy({"strategy": "depthfl"})
    assert s.extra_central_metrics(logits, y) == {"acc-ensemble": 0.5}


# ---------------------------------------------------------------------- ReeFL
def test_reefl_teacher_is_lowest_moving_average_exit():
    c = 3
    y = torch.zeros(4, dtype=torch.long)

    def logits(margin):  # CE falls as the margin of the true class grows
        z = torch.zeros(4, c)
        z[:, 0] = margin
        return z

    state: dict = {}
    ctx = ObjectiveContext(instructions({"server-round": 1}), state)
    b1 = EEOutput([logits(6.0), logits(0.0), logits(-4.0)], [])
    losses.get("reefl")(b1, y, ctx)
    ce1 = np.array([float(F.cross_entropy(z, y)) for z in b1.logits])
    np.testing.assert_allclose(state["reefl-ma"], 0.2 * ce1, rtol=1e-6)
    b2 = EEOutput([logits(0.0), logits(0.5), logits(2.0)], [])  # batch-best exit is now 3
    ce2 = np.array([float(F.cross_entropy(z, y)) for z in b2.logits])
    ma = 0.8 * 0.2 * ce1 + 0.2 * ce2
    t = int(np.argmin(ma))
    assert t == 0 and int(np.argmin(ce2)) == 2
    expected = ce2.sum() + sum(kl(b2.logits[t], z, 1.0) for j, z in enumerate(b2.logits) if j != t)
    assert float(losses.get("reefl")(b2, y, ctx)) == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(state["reefl-ma"], ma, rtol=1e-6)
    losses.get("reefl")(b2, y, ObjectiveContext(instructions({"server-round": 2}), state))  # new round: reset
    np.testing.assert_allclose(state["reefl-ma"], 0.2 * ce2, rtol=1e-6)


def test_reefl_modulation_replaces_the_cls_token_by_rees_last_output():
    """After every block but the last, the CLS token the next block reads is Ree's output at
    the last position (ReeFL's modulation); the other tokens pass unchanged."""
    s = make_strategy({"strategy": "reffl", **TINY_VIT})
    model = s.family.build().eval()
    ree_out, block_in = [], []
    model.ree.register_forward_hook(lambda mod, args, out: ree_out.append(out))
    for block in model.blocks:
        block.register_forward_pre_hook(lambda mod, args: block_in.append(args[0]))
    with torch.no_grad():
        latent = model.to_latent(s.family.example_input(3).normal_())
        model.forward_latent(latent)
    assert len(block_in) == len(model.blocks) == len(ree_out)
    for l in range(1, len(model.blocks)):
        torch.testing.assert_close(block_in[l][:, 0], ree_out[l - 1][:, -1])
        assert not torch.allclose(block_in[l][:, 0], model.blocks[l - 1](block_in[l - 1])[:, 0])


def test_reefl_grad_clip_by_value():
    model = torch.nn.Linear(3, 2)
    ctx = ObjectiveContext(instructions({"grad-clip": 1.0}), {}, model)
    x, y = torch.randn(8, 3) * 100, torch.zeros(8, dtype=torch.long)
    out = EEOutput([model(x) * 50, model(x)], [])
    losses.get("reefl")(out, y, ctx).backward()
    assert max(float(p.grad.abs().max()) for p in model.parameters()) <= 1.0


def test_reefl_shared_exit_averaged_over_all_clients():
    with pytest.raises(ConfigError, match="needs model='vit'"):
        load_config({"strategy": "reffl", "model": "cnn"})
    s = make_strategy({"strategy": "reefl", **TINY_VIT})
    assert s.family.name == "vit-ree" and s.family.exit_after == [1, 2, 3, 4]
    assert not any(k.startswith("exits.") for k in s.global_state)
    zero_global(s)
    ns = {1: 10, 2: 20, 3: 30, 4: 40}
    for level in ns:
        assert any(k.startswith("ree.") for k in s.family.shapes(s.level_spec(level)))
    new = s.aggregate(1, [update(s, k, const_state(s, k, float(k)), n) for k, n in ns.items()])
    everyone = sum(k * n for k, n in ns.items()) / sum(ns.values())  # 3.0
    for key in ("ree.pos", "ree.layer.attn.q.weight", "ree.head.fc.bias", "embed.proj.weight"):
        np.testing.assert_allclose(new[key], everyone)
    np.testing.assert_allclose(new["blocks.2.mlp.fc1.weight"], (3 * 30 + 4 * 40) / 70)
    np.testing.assert_allclose(new["blocks.3.mlp.fc1.weight"], 4.0)
    assert s.instructions(1, 1).lr == pytest.approx(0.005)


# ---------------------------------------------------------------------- whole rounds
RUNS = [("exclusivefl", "vit"), ("exclusivefl", "cnn"), ("inclusivefl", "vit"),
        ("inclusivefl", "cnn"), ("depthfl", "vit"), ("depthfl", "cnn"), ("scalefl", "vit"),
        ("scalefl", "cnn"), ("reffl", "vit")]


@pytest.mark.parametrize("strategy, model", RUNS)
def test_one_round_in_process(strategy, model, out_dir):
    rc = {**TINY_VIT, "strategy": strategy, "model": model, "num-server-rounds": 1,
          "max-samples-per-client": 32, "max-test-samples": 40, "out-dir": out_dir}
    if strategy == "depthfl":
        rc["depthfl-feddyn"] = True
    summary = run(InProcessGrid(rc, 4), load_config(rc))
    train = summary["rounds"][0]["train"]
    assert train["clients-failed"] == 0 and train["clients-ok"] == (1 if strategy == "exclusivefl" else 4)
    assert not summary["failed_replies"]
    assert summary["final"]["acc-mean"] is not None
