"""DarkDistill and DarkDistill-PL: exit routing, RKD, difficulty weights, generators, merge,
the difficulty record through the ClientApp, whole in-process rounds and checkpoints."""
import io
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord
from scipy.stats import spearmanr

from inprocess import InProcessGrid, make_strategy, train_round
from fedeen.app_config import load_config
from fedeen.config import ConfigError
from fedeen.data import load_client_data
from fedeen.server_app import run
from models.base import SubmodelSpec
from models.family import EENFamily
from models.generator import LatentGenerator, diversity_loss
from models.registry import ModelConfig
from models.vit import ViTOptions
from models.submodel import slice_state
from fedeen.protocol import DIFFICULTY_RECORD, to_record
from strategies.base import ClientUpdate
from strategies.darkdistill import (difficulty_generator_step, difficulty_weights,
                                    exit1_difficulty, merge_levels, reverse_kd_pair_loss)
from strategies.kd_losses import rkd_angle, rkd_distance
from fedeen.routing import exit_counts, route_batch

SMALL = {"num-server-rounds": 1, "max-test-samples": 100, "max-samples-per-client": 64,
         "image-size": 16}
VIT = {"model": "vit", "vit-blocks": 4, "vit-dim": 32, "vit-heads": 2, "vit-patch": 4}


pytestmark = pytest.mark.usefixtures("one_thread")



def fake_updates(strategy, n=40, seed=0):
    """One upload per level: the level's slice of the global model plus random conditions."""
    rng = np.random.default_rng(seed)
    updates = []
    for k in strategy.levels:
        spec = strategy.level_spec(k)
        state = slice_state(strategy.global_state, strategy.family.shapes(spec))
        state = {key: (v + rng.normal(0, 0.01, v.shape).astype(v.dtype)
                       if v.dtype.kind == "f" else v) for key, v in state.items()}
        rec = {"labels": rng.integers(0, strategy.family.cfg.num_classes, n).astype(np.int64),
               "difficulty": rng.uniform(0, 3, n).astype(np.float32)}
        updates.append(ClientUpdate(100 + k, k, spec, state, n * k, {}, {"difficulty": rec}))
    return updates


def step(strategy, updates, rnd=1):
    """Aggregate, run the server step and install the result; the server step's metrics."""
    metrics = strategy.aggregate_updates(rnd, updates)
    metrics.pop("global-rel-change")
    return metrics


# ---------------------------------------------------------------------- exit routing
def test_exit_counts_are_msdnet_floor_quotas():
    assert exit_counts(32, 4, 1.5) == [3, 5, 8, 16]   # q = .123 .185 .277 .415
    assert exit_counts(10, 3, 1.5) == [2, 3, 5]       # q = .211 .316 .474
    assert exit_counts(7, 1, 1.5) == [7]
    for n, m in itertools.product(range(0, 40), range(1, 5)):
        assert sum(exit_counts(n, m, 1.5)) == n


def test_route_batch_takes_the_most_confident_remaining_samples_per_exit():
    conf1 = torch.tensor([0.55, 0.9, 0.65, 0.95, 0.6, 0.5, 0.7, 0.75, 0.8, 0.85])
    conf2 = torch.tensor([0.9, 0.99, 0.55, 0.6, 0.8, 0.65, 0.85, 0.7, 0.75, 0.5])

    def logits(conf):  # two classes: the max-softmax is exactly conf
        return torch.stack([torch.log(conf), torch.log(1 - conf)], dim=1)

    ex = route_batch([logits(conf1), logits(conf2), torch.zeros(10, 2)], 1.5)
    assert torch.bincount(ex, minlength=3).tolist() == [2, 3, 5]
    assert set(torch.nonzero(ex == 0).squeeze(1).tolist()) == {3, 1}      # top-2 at exit 1
    assert set(torch.nonzero(ex == 1).squeeze(1).tolist()) == {0, 6, 4}   # top-3 of the rest
    assert set(torch.nonzero(ex == 2).squeeze(1).tolist()) == {2, 5, 7, 8, 9}


def test_route_batch_keeps_exact_counts_when_confidences_tie():
    logits = [torch.zeros(32, 5), torch.full((32, 5), 3.0), torch.randn(32, 5), torch.randn(32, 5)]
    ex = route_batch(logits, 1.5)
    assert torch.bincount(ex, minlength=4).tolist() == [3, 5, 8, 16]


# ---------------------------------------------------------------------- RKD
def _direct_rkd(s, t):
    s, t = s.double().numpy(), t.double().numpy()
    n = len(s)

    def dist(x):
        d = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(n)] for i in range(n)])
        return d / d[~np.eye(n, dtype=bool)].mean()

    def angles(x):
        out = np.zeros((n, n, n))
        for i, j, k in itertools.product(range(n), repeat=3):
            a, b = x[j] - x[i], x[k] - x[i]
            na, nb = np.linalg.norm(a), np.linalg.norm(b)
            a = a / na if na > 0 else a
            b = b / nb if nb > 0 else b
            out[i, j, k] = a @ b
        return out

    def smooth_l1(a, b):
        d = np.abs(a - b)
        return np.where(d < 1, 0.5 * d ** 2, d - 0.5).mean()

    return smooth_l1(dist(s), dist(t)), smooth_l1(angles(s), angles(t))


def test_rkd_losses_match_a_direct_computation_and_detach_the_teacher():
    g = torch.Generator().manual_seed(3)
    student = (torch.randn(6, 4, generator=g) * 2).requires_grad_(True)
    teacher = torch.randn(6, 7, generator=g).requires_grad_(True)   # widths may differ
    want_d, want_a = _direct_rkd(student.detach(), teacher.detach())
    got_d, got_a = rkd_distance(student, teacher), rkd_angle(student, teacher)
    assert got_d.item() == pytest.approx(want_d, rel=1e-4, abs=1e-6)
    assert got_a.item() == pytest.approx(want_a, rel=1e-4, abs=1e-6)
    (got_d + got_a).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    # relations are invariant to scale and translation of the student
    assert float(rkd_distance(3 * teacher.detach() + 1, teacher)) == pytest.approx(0, abs=1e-5)
    assert float(rkd_angle(3 * teacher.detach() + 1, teacher)) == pytest.approx(0, abs=1e-5)


# ---------------------------------------------------------------------- difficulty matching
def test_difficulty_weights_on_a_hand_made_case():
    d = torch.tensor([1.0, 3.0])
    groups = [torch.tensor([0.0, 1.0, 2.0]), torch.tensor([3.0]), torch.tensor([5.0, 7.0])]
    # means 1, 3, 6; dist rows (0,2,5)/7 and (2,0,3)/5; a = (0.4, 2/7, 5/7 + 0.6)
    a = torch.tensor([0.4, 2 / 7, 5 / 7 + 0.6])
    want = torch.softmax(-a, 0)
    assert torch.allclose(difficulty_weights(d, groups), want, atol=1e-5)
    assert difficulty_weights(d, groups, "hard").tolist() == [0.0, 1.0, 0.0]
    # an exit no sample was routed to gets weight 0, the others still sum to 1
    w = difficulty_weights(d, [groups[0], torch.tensor([]), groups[2]])
    assert w[1] == 0 and float(w.sum()) == pytest.approx(1.0)
    assert w[0] > w[2]


def test_reverse_kd_pair_loss_only_uses_samples_at_the_teachers_last_exit():
    from models.base import EEOutput
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(8, 5, generator=g) for _ in range(2)]
    teacher = EEOutput([torch.zeros(8, 3)] * 2, feats)
    s_feats = [torch.randn(8, 5, generator=g, requires_grad=True) for _ in range(3)]
    student = EEOutput([torch.zeros(8, 3)] * 3, s_feats)
    t_exit = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0])
    s_exit = torch.tensor([0, 1, 2, 2, 0, 1, 2, 2])
    diff = torch.arange(8.0)
    loss, _ = reverse_kd_pair_loss(teacher, t_exit, student, s_exit, diff, 5.0, 10.0)
    loss.backward()
    for f in s_feats:
        assert f.grad[4:].abs().sum() == 0 and f.grad[:4].abs().sum() > 0
    assert reverse_kd_pair_loss(teacher, torch.zeros(8, dtype=torch.long), student,
                                s_exit, diff, 5.0, 10.0)[0].item() == 0.0


# ---------------------------------------------------------------------- generators
def test_difficulty_conditional_generator_follows_the_requested_difficulty():
    torch.manual_seed(0)
    family = EENFamily("vit", ModelConfig(num_classes=4, image_size=8, backbone=ViTOptions(
        patch=4, dim=16, blocks=4, heads=2)))
    teacher = family.build().eval()
    with torch.no_grad():  # a confident fixed teacher, so that CE spans a useful range
        for name, p in teacher.named_parameters():
            if name.startswith("exits.") and name.endswith("fc.weight"):
                p.mul_(30)
    teacher.requires_grad_(False)
    dm = family.build(SubmodelSpec(1)).eval()
    dm.load_state_dict({k: v for k, v in teacher.state_dict().items() if k in dm.state_dict()})
    dm.requires_grad_(False)
    gen = LatentGenerator(4, teacher.latent_shape(), hidden=64)
    opt = torch.optim.Adam(gen.parameters(), lr=0.01)
    rng = torch.Generator().manual_seed(0)
    for _ in range(150):
        y = torch.randint(0, 4, (32,), generator=rng)
        d = torch.rand(32, generator=rng) * 3
        m = difficulty_generator_step(gen, opt, teacher, dm, y, d, gen.noise(32, rng), 1.5)
    assert m["gen-diff-mse"] < 0.5
    gen.eval()
    with torch.no_grad():
        d = torch.linspace(0.05, 3.0, 40)
        y = torch.arange(40) % 4
        measured = exit1_difficulty(dm, gen(y, gen.noise(40, rng), d), y)
    rho = spearmanr(d.numpy(), measured.numpy()).statistic
    assert rho > 0.6, rho


@pytest.mark.parametrize("shape", [(5, 16), (16, 16, 16), (8, 7, 9)])
def test_generators_emit_the_latent_shape_with_and_without_difficulty(shape):
    for dc in (True, False):
        g = LatentGenerator(10, shape, hidden=32, difficulty_input=dc)
        y = torch.tensor([0, 3, 9])
        eps = g.noise(3)
        out = g(y, eps, torch.tensor([0.1, 1.0, 2.0]) if dc else None)
        assert out.shape == (3, *shape)
        assert 0 < diversity_loss(eps, out).item() <= 1
    assert not hasattr(LatentGenerator(10, shape, 32, False).diff_proj, "weight")


# ---------------------------------------------------------------------- merge
def test_segment_merge_math_on_hand_made_states():
    a = lambda v: np.array([v], dtype=np.float32)  # noqa: E731
    global_state = {"embed.w": a(0), "blocks.0.w": a(0), "blocks.1.w": a(0), "exits.2.w": a(9)}
    levels = {1: {"embed.w": a(1)},
              2: {"embed.w": a(2), "blocks.0.w": a(20)},
              3: {"embed.w": a(3), "blocks.0.w": a(30), "blocks.1.w": a(300)},
              4: {"embed.w": a(100), "blocks.0.w": a(100), "blocks.1.w": a(100),
                  "exits.2.w": a(100)}}
    n = {1: 1, 2: 2, 3: 3, 4: 0}  # level 4 sent nothing this round
    merged, back = merge_levels(global_state, levels, n, lambda k: {key: (1,) for key in levels[k]})
    assert merged["embed.w"][0] == pytest.approx((1 * 1 + 2 * 2 + 3 * 3) / 6)
    assert merged["blocks.0.w"][0] == pytest.approx((2 * 20 + 3 * 30) / 5)
    assert merged["blocks.1.w"][0] == pytest.approx(300)
    assert merged["exits.2.w"][0] == 9  # held by no level with examples: unchanged
    for k, state in back.items():
        assert set(state) == set(levels[k])
        for key, v in state.items():
            assert v[0] == pytest.approx(merged[key][0])


def test_darkdistill_round_updates_level_models_and_merges_them():
    s = make_strategy({**SMALL, "strategy": "darkdistill"})
    before = {k: v.copy() for k, v in s.global_state.items()}
    metrics = step(s, fake_updates(s))
    for key in ("gen-loss", "gen-diff-req", "gen-diff-meas", "kd-loss"):
        assert math.isfinite(metrics[key])
    assert 0 < metrics["kd-rel-change"] < 1  # the KD moved the student level models
    assert any(not np.array_equal(before[k], s.global_state[k]) for k in before)
    for k in s.levels:  # after the merge every level model is a slice of the global EEN
        for key, v in s.level_models[k].items():
            np.testing.assert_array_equal(v, s.global_state[key])


def test_ablation_switches():
    off = make_strategy({**SMALL, "strategy": "darkdistill", "darkdistill-reverse-kd": False})
    ups = fake_updates(off)
    assert step(off, ups) == {}
    merged, _ = merge_levels(off.family.init_state(off.cfg.seed),
                             {u.level: u.state for u in ups},
                             {u.level: u.num_examples for u in ups},
                             lambda k: off.family.shapes(off.level_spec(k)))
    for key, v in merged.items():
        np.testing.assert_allclose(off.global_state[key], v, rtol=1e-6)
    no_dc = make_strategy({**SMALL, "strategy": "darkdistill",
                           "darkdistill-difficulty-conditioning": False})
    assert no_dc.generators[1].diff_proj is None
    assert math.isfinite(step(no_dc, fake_updates(no_dc))["kd-loss"])
    pl = make_strategy({**SMALL, **VIT, "strategy": "darkdistill-pl",
                        "darkdistill-pl-increase": False})
    m = step(pl, fake_updates(pl))
    assert m["gen-gap"] == 0 and m["kd-gap"] == 0 and math.isfinite(m["kd-rkd"])
    with pytest.raises(ConfigError):
        load_config({"strategy": "darkdistill", "darkdistill-weighting": "fuzzy"})
    with pytest.raises(ConfigError):
        load_config({"strategy": "darkdistill-pl", "darkdistill-pl-batch-size": 0})


# ---------------------------------------------------------------------- through the ClientApp
def test_difficulty_record_round_trips_through_the_client_app(out_dir):
    rc = {**SMALL, "strategy": "darkdistill", "out-dir": out_dir}
    grid = InProcessGrid(rc, 4)
    s = make_strategy(rc)
    msgs = list(s.configure_train(1, to_record(s.global_state), ConfigRecord(), grid))
    assert all(m.content["config"]["record-difficulty"] for m in msgs)
    updates = s.collect(grid.send_and_receive(msgs))
    assert len(updates) == 4 and not s.rejected
    for u in updates:
        rec = u.records["difficulty"]
        pid = grid.node_ids.index(u.node_id)
        train = load_client_data(s.cfg, pid, 4).train
        assert len(rec["labels"]) == len(rec["difficulty"]) == u.num_examples == len(train)
        np.testing.assert_array_equal(rec["labels"], train.y.numpy())
        # difficulty = CE at exit 1 of the model the client received (its level model)
        model = s.family.build(u.spec).eval()
        model.load_state_dict({k: torch.from_numpy(v) for k, v in s.level_model(u.level).items()})
        with torch.no_grad():
            want = torch.nn.functional.cross_entropy(model(train.x).logits[0], train.y,
                                                     reduction="none")
        np.testing.assert_allclose(rec["difficulty"], want.numpy(), rtol=1e-4, atol=1e-5)
        with torch.no_grad():  # the embedding statistics: per-element moments of to_latent
            latent = model.to_latent(train.x).double()
        np.testing.assert_allclose(rec["latent_mean"], latent.mean(0).numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(rec["latent_sq_mean"], latent.pow(2).mean(0).numpy(),
                                   rtol=1e-4, atol=1e-5)
    s.aggregate(1, updates)
    assert sorted(s.conditions) == [1, 2, 3, 4]


@pytest.mark.parametrize("strategy", ["darkdistill", "darkdistill-pl"])
@pytest.mark.parametrize("model", ["cnn", "vit"])
def test_one_in_process_round(strategy, model, out_dir):
    rc = {**SMALL, "strategy": strategy, "out-dir": out_dir, **(VIT if model == "vit" else {})}
    summary = run(InProcessGrid(rc, 4), load_config(rc))
    train = summary["rounds"][0]["train"]
    assert train["clients-ok"] == 4 and train["clients-failed"] == 0
    assert not summary["failed_replies"]
    assert math.isfinite(train["kd-loss"]) and math.isfinite(train["gen-loss"])
    assert all(math.isfinite(v) for v in summary["final"].values() if v is not None)
    # the diagnostics measured on real validation images, and their plot
    for key in ("diag-kd-grad-gen", "diag-kd-grad-real", "kd-move-over-wd"):
        assert math.isfinite(train[key]) and train[key] > 0, key
    assert any(k.startswith("diag-rms-ratio-") for k in train)
    assert (Path(summary["run_dir"]) / "server_kd.png").stat().st_size > 0


# ---------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("strategy", ["darkdistill", "darkdistill-pl"])
def test_checkpoint_round_trip_of_the_server_state(strategy):
    rc = {**SMALL, **VIT, "strategy": strategy}
    a = make_strategy(rc)
    step(a, fake_updates(a, seed=1), rnd=1)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = make_strategy(rc)
    b.initialize({k: v.copy() for k, v in a.global_state.items()})
    b.load_state_dict(torch.load(buf, weights_only=True))
    for k, g in a.generators.items():
        for (name, x), (_, y) in zip(g.state_dict().items(), b.generators[k].state_dict().items()):
            assert torch.equal(x, y), name
        sa, sb = a.gen_opts[k].state_dict()["state"], b.gen_opts[k].state_dict()["state"]
        assert sa and all(torch.equal(sa[i]["exp_avg"], sb[i]["exp_avg"]) for i in sa)
    for k, cond in a.conditions.items():
        np.testing.assert_array_equal(cond["difficulty"], b.conditions[k]["difficulty"])
    if strategy == "darkdistill":
        for k, state in a.level_models.items():
            for key, v in state.items():
                np.testing.assert_array_equal(v, b.level_models[k][key])
    # the restored server continues exactly like the original
    ups = fake_updates(a, seed=2)
    assert step(a, ups, rnd=2) == pytest.approx(step(b, ups, rnd=2))
    for key, v in a.global_state.items():
        np.testing.assert_array_equal(v, b.global_state[key])


def test_darkdistill_rejects_a_broken_difficulty_record():
    strategy = make_strategy({"strategy": "darkdistill"})
    spec = strategy.level_spec(1)
    bad = ClientUpdate(1, 1, spec, {}, 3, {}, {DIFFICULTY_RECORD: {
        "labels": np.array([0, 1, 2]), "difficulty": np.array([0.1, np.nan, 0.3], np.float32)}})
    assert "non-finite" in strategy.record_problems(bad)
    shape = strategy.latent_shape
    stats = {"latent_mean": np.full(shape, 0.5, np.float32),
             "latent_sq_mean": np.full(shape, 1.0, np.float32)}
    good = ClientUpdate(1, 1, spec, {}, 3, {}, {DIFFICULTY_RECORD: {
        "labels": np.array([0, 1, 2]), "difficulty": np.array([0.1, 0.2, 0.3], np.float32),
        **stats}})
    assert strategy.record_problems(good) is None
    for name, value, why in [("latent_sq_mean", 0.1, "negative variance"),
                             ("latent_mean", np.inf, "non-finite"),
                             ("latent_sq_mean", 1e8, "RMS")]:
        rec = dict(good.records[DIFFICULTY_RECORD])
        rec[name] = np.full(shape, value, np.float32)
        broken = ClientUpdate(1, 1, spec, {}, 3, {}, {DIFFICULTY_RECORD: rec})
        assert why in strategy.record_problems(broken), name
