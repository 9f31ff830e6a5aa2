"""The server-side KD mechanisms of DarkDistill and DarkDistill-PL, each tested so that the
test fails when the mechanism is broken: the KD moves the students beyond weight decay, the
pairs run shallow -> deep on the distinct pre-merge level models, pairs are weighted by
n^(k), the generators' output scale stays anchored to the real embeddings, the ensemble
teachers, the {s-1, s, s+1} adjacency and the sign of the increase term."""
import math

import numpy as np
import pytest
import torch

from inprocess import InProcessGrid, make_strategy, train_round
from fedeen.app_config import load_config
from fedeen.data import load_server_data
from models.base import EEOutput
from models.generator import standardize_to, statistic_loss
from strategies import darkdistill as dd
from strategies import darkdistill_pl as ddpl
from strategies.darkdistill_pl import adjacent_kd_loss, ensemble_weights

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {"num-server-rounds": 3, "max-test-samples": 100, "max-samples-per-client": 64,
         "image-size": 16}
VIT = {"model": "vit", "vit-blocks": 4, "vit-dim": 32, "vit-heads": 2, "vit-patch": 4}


def strategy_with_probe(rc):
    """A strategy that sees the server's validation hold-out, as in a real run."""
    s = make_strategy(rc)
    s.use_server_data(load_server_data(load_config(rc)).val)
    return s


def rounds(rc, n, spy=None):
    """``n`` in-process rounds through the real ClientApp; every round's server metrics."""
    s = strategy_with_probe(rc)
    if spy is not None:
        spy(s)
    grid = InProcessGrid(rc, 4)
    out = []
    for rnd in range(1, n + 1):
        _, (_, metrics) = train_round(s, grid, rnd)
        out.append(dict(metrics))
    return s, out


# ---------------------------------------------------------------------- DarkDistill
def test_reverse_kd_moves_the_students_beyond_weight_decay():
    """The KD must do more than weight decay alone: with its loss multiplied by zero the
    students move exactly as far as weight decay moves them (ratio 1)."""
    _, ms = rounds({**SMALL, **VIT, "strategy": "darkdistill"}, 2)
    for m in ms:
        assert m["kd-move-over-wd"] > 3, m["kd-move-over-wd"]
        assert m["kd-rel-change"] > m["kd-wd-rel-change"] > 0


def test_pairs_run_shallow_to_deep_on_distinct_pre_merge_level_models():
    """Level 1 is never a student and level K never a teacher; the KD starts from each
    level's own FedAvg model (not the merge) and changes every student level model."""
    seen = {}

    def spy(s):
        distill = s.distill

        def wrapped(rnd):
            seen["before"] = {k: dict(v) for k, v in s.level_models.items()}
            metrics = distill(rnd)
            seen["after"] = {k: dict(v) for k, v in s.level_models.items()}
            return metrics

        s.distill = wrapped

    s, ms = rounds({**SMALL, **VIT, "strategy": "darkdistill", "num-server-rounds": 1}, 1, spy)
    before, after = seen["before"], seen["after"]
    # distinct pre-merge level models: the shared first block differs between levels
    key = "blocks.0.mlp.fc1.weight"
    assert not np.allclose(before[1][key], before[2][key])
    assert not np.allclose(before[2][key], before[3][key])
    unchanged = lambda k: all(np.array_equal(before[k][n], after[k][n]) for n in before[k])
    assert unchanged(1)  # level 1 is only ever a teacher
    assert not any(unchanged(k) for k in (2, 3, 4))  # every deeper level is a student
    K = s.cfg.num_levels
    pairs = {int(name.split("-p")[1].split("-")[0]) for name in ms[0] if name.startswith("diag-w-p")}
    assert pairs == set(range(1, K))  # teachers 1..K-1: level K teaches nobody


def test_pair_losses_are_weighted_by_the_teacher_levels_examples(monkeypatch):
    s = make_strategy({**SMALL, **VIT, "strategy": "darkdistill"})
    s.level_examples = {1: 10, 2: 30, 3: 60, 4: 100}

    def fake_pair(teacher, t_exit, student, s_exit, difficulty, dr, ar, weighting):
        # the loss of pair k -> k+1 is 10^k, readable from the teacher's exit count
        return torch.tensor(10.0 ** teacher.num_exits), torch.ones(student.num_exits)

    monkeypatch.setattr(dd, "reverse_kd_pair_loss", fake_pair)
    models = {k: dd.server_model(s.family, s.level_spec(k), s.level_model(k), s.device)
              for k in s.levels}
    x = torch.randn(8, *s.latent_shape)
    batches = {k: (x, torch.rand(8)) for k in (1, 2, 3)}
    loss, _ = s.kd_objective([(1, 2), (2, 3), (3, 4)], models, batches, torch.Generator())
    want = (10 * 10 + 30 * 100 + 60 * 1000) / 100
    assert loss.item() == pytest.approx(want)


@pytest.mark.parametrize("strategy", ["darkdistill", "darkdistill-pl"])
def test_generated_latents_keep_the_real_embeddings_scale(strategy):
    """With the anchor on, the generated/real RMS ratio stays within a factor of 1.5 of 1 in
    every round, although the generators train hard (20 steps per server epoch)."""
    rc = {**SMALL, **VIT, "strategy": strategy, "darkdistill-gen-iters": 20}
    _, ms = rounds(rc, 3)
    for m in ms:
        ratios = [v for k, v in m.items() if k.startswith("diag-rms-ratio-")]
        assert ratios and all(1 / 1.5 < r < 1.5 for r in ratios), ratios


def test_weightings_differ_as_specified():
    g = torch.Generator().manual_seed(0)
    d = torch.tensor([0.1, 0.2, 2.0, 2.2])
    groups = [torch.tensor([0.1, 0.2]), torch.tensor([1.0]), torch.tensor([])]
    soft = dd.difficulty_weights(d, groups, "soft")
    assert soft[2] == 0 and soft.sum().item() == pytest.approx(1.0)
    assert dd.difficulty_weights(d, groups, "uniform").tolist() == [0.5, 0.5, 0.0]
    bins = dd.weighting_difficulty(d, "placeholder", g)
    assert bins.dtype == torch.float32 and set(bins.tolist()) <= set(range(dd.PLACEHOLDER_BINS))
    assert torch.equal(dd.weighting_difficulty(d, "soft", g), d)


# ---------------------------------------------------------------------- the scale anchor
def test_anchor_functions_hold_the_statistics():
    torch.manual_seed(0)
    mean, std = torch.randn(5, 3), torch.rand(5, 3) + 0.5
    raw = 40 * torch.randn(64, 5, 3) + 7
    out = standardize_to(raw, mean, std)
    torch.testing.assert_close(out.mean(0), mean, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.std(0, unbiased=False), std, atol=1e-3, rtol=1e-3)
    real = mean + std * torch.randn(4096, 5, 3)
    assert statistic_loss(real, mean, std) < 0.01
    assert statistic_loss(3 * real, mean, std) > 1.0  # a 3x scale costs about (3 - 1)^2


# ---------------------------------------------------------------------- DarkDistill-PL
def test_pl_ensemble_teacher_weights_and_mixture():
    owners = {1: [1, 2, 3, 4], 3: [3, 4], 4: [4]}
    w = ensemble_weights(owners, {1: 10, 2: 30, 3: 60, 4: 100})
    assert w[1] == pytest.approx([0.05, 0.15, 0.3, 0.5])
    assert w[3] == pytest.approx([60 / 160, 100 / 160]) and w[4] == [1.0]

    class Fixed:
        def __init__(self, v):
            self.v = v

        def forward_latent(self, x):
            return EEOutput([torch.full((2, 3), self.v)] * 4, [torch.full((2, 5), self.v)] * 4)

    models = {k: Fixed(float(k)) for k in (1, 2, 3, 4)}
    z, h = ddpl.DarkDistillPL.ensemble(models, owners, w, 1, torch.zeros(2))
    want = 0.05 * 1 + 0.15 * 2 + 0.3 * 3 + 0.5 * 4
    assert torch.allclose(z, torch.full((2, 3), want)) and torch.allclose(h, torch.full((2, 5), want))


def test_pl_every_exit_distils_from_its_own_and_the_adjacent_batches(monkeypatch):
    m = 4
    calls = []

    def fake_rkd(student, teacher, dr, ar):
        calls.append((int(student[0, 0]), int(teacher[0, 0])))
        return torch.zeros(())

    monkeypatch.setattr(ddpl, "rkd_loss", fake_rkd)
    # student feature of exit s on batch t carries s * 10 + t; the teacher of batch t carries t
    student = {t: [torch.full((2, 2), float(s * 10 + t)) for s in range(m)] for t in range(m)}
    teacher = {t: torch.full((2, 2), float(t)) for t in range(m)}
    adjacent_kd_loss(student, teacher, m, 5.0, 10.0)
    got = {(code // 10, code % 10, t) for code, t in calls}
    assert all(b == t for _, b, t in got)  # the student ran on the teacher's own batch
    assert {(s, t) for s, _, t in got} == {(s, t) for s in range(m) for t in (s - 1, s, s + 1)
                                           if 0 <= t < m}
    calls.clear()
    adjacent_kd_loss(student, {t: v for t, v in teacher.items() if t != 2}, m, 5.0, 10.0)
    assert all(t != 2 for _, t in calls)  # an exit without a teacher teaches nobody


def test_pl_increase_term_signs():
    """The generators ascend the exits' difficulty gaps (loss minus the gap), the KD
    descends their absolute value (loss plus |gap|)."""
    rc = {**SMALL, **VIT, "strategy": "darkdistill-pl", "num-server-rounds": 1,
          "darkdistill-pl-gap-weight": 0.5, "darkdistill-gen-iters": 1}
    s, (m,) = rounds(rc, 1)
    n = s.family.num_exits
    want_gen = n * m["gen-ce"] + n * m["gen-div"] + m["gen-anchor-loss"] - 0.5 * m["gen-gap"]
    assert m["gen-loss"] == pytest.approx(want_gen, rel=1e-4, abs=1e-5)
    assert m["kd-gap"] >= 0
    assert m["kd-loss"] == pytest.approx(m["kd-rkd"] + 0.5 * m["kd-gap"], rel=1e-4, abs=1e-6)
    assert math.isfinite(m["diag-kd-grad-gen"]) and math.isfinite(m["diag-kd-grad-real"])


@pytest.mark.parametrize("strategy", ["darkdistill", "darkdistill-pl"])
def test_diagnostics_on_real_images_do_not_change_the_training(strategy):
    """The real-image measurements draw from their own generator and take no step: a run
    with the server's validation images gives bit for bit the run without them."""
    rc = {**SMALL, **VIT, "strategy": strategy, "num-server-rounds": 2}
    with_probe, ms = rounds(rc, 2)
    assert "diag-kd-grad-real" in ms[0]
    without = make_strategy(rc)
    grid = InProcessGrid(rc, 4)
    for rnd in (1, 2):
        _, (_, m) = train_round(without, grid, rnd)
        assert "diag-kd-grad-real" not in m
    for key, value in with_probe.global_state.items():
        np.testing.assert_array_equal(value, without.global_state[key])
