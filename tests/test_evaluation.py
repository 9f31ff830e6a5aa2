"""Central evaluation: exit quotas and thresholds, budget curves, the evaluator's choice of
model per exit and of the best-validation round."""
import numpy as np
import pytest
import torch

from fedeen.data import load_server_data
from fedeen.evaluation import budget_curve, exit_accuracies, fit_thresholds, quotas, route
from fedeen.protocol import to_record
from fedeen.runtime import resolve_device
from fedeen.server_app import CentralEvaluator
from inprocess import make_strategy


def logits_from_conf(conf, correct_class=None):
    """Two-class logits whose max-softmax equals ``conf`` for class 0."""
    conf = torch.tensor(conf, dtype=torch.float64)
    z0 = torch.log(conf / (1 - conf))
    return torch.stack([z0, torch.zeros_like(z0)], 1).float()


def test_quotas_match_msdnet():
    np.testing.assert_allclose(quotas(1.5, 4), [0.123, 0.185, 0.277, 0.415], atol=1e-3)
    np.testing.assert_allclose(quotas(1.0, 4), [0.25] * 4)


def test_thresholds_take_the_quota_of_most_confident_not_yet_taken():
    # 8 samples, quotas for 2 exits with p=1 -> 4 samples at exit 1
    e1 = logits_from_conf([0.9, 0.8, 0.55, 0.6, 0.95, 0.7, 0.51, 0.65])
    e2 = logits_from_conf([0.6] * 8)
    t = fit_thresholds([e1, e2], quotas(1.0, 2))
    assert abs(t[0] - 0.7) < 1e-5 and t[1] == float("-inf")
    exits = route([e1, e2], t)
    assert exits.tolist() == [0, 0, 1, 1, 0, 0, 1, 1]


def test_budget_curve_trades_accuracy_for_flops():
    g = torch.Generator().manual_seed(0)
    n = 400
    y = torch.randint(0, 2, (n,), generator=g)
    # exit 1 right 60% of the time, exit 2 always right
    wrong = torch.rand(n, generator=g) < 0.4
    scale = 0.1 + torch.rand(n, 1, generator=g) * 3  # distinct confidences, no ties
    z1 = torch.nn.functional.one_hot(torch.where(wrong, 1 - y, y), 2).float() * scale
    z2 = torch.nn.functional.one_hot(y, 2).float() * 5
    curve = budget_curve([z1, z2], [z1, z2], y, [1.0, 3.0], ps=(0.1, 10.0))
    cheap, costly = curve
    assert cheap.flops < costly.flops  # p < 1: quotas favour the first exit
    assert cheap.exit_fractions[0] > 0.8 and costly.exit_fractions[1] > 0.8
    assert cheap.accuracy < costly.accuracy
    assert exit_accuracies([z1, z2], y)[1] == 1.0


def evaluator_for(strategy):
    cfg = strategy.cfg
    return CentralEvaluator(strategy.family, load_server_data(cfg), cfg, resolve_device(cfg),
                            strategy)


def constant_heads(state, cls, num_classes=10):
    """A copy of ``state`` whose every exit always predicts class ``cls``."""
    out = {k: v.copy() for k, v in state.items()}
    for k in out:
        if k.startswith("exits.") and k.endswith("fc.bias"):
            out[k] = np.eye(num_classes, dtype=np.float32)[cls] * 1e4
    return out


def test_exit_states_score_an_exit_on_its_own_level_model():
    strategy = make_strategy({"max-test-samples": 200})
    ev = evaluator_for(strategy)
    y = ev.data.test.y
    share = [float((y == c).float().mean()) for c in range(10)]
    a, b = int(np.argmax(share)), int(np.argmin(share))
    global_state = constant_heads(strategy.global_state, a)
    own = constant_heads(strategy.global_state, b)
    own = {k: v for k, v in own.items() if k in strategy.family.shapes(strategy.level_spec(1))}
    strategy.exit_states = lambda: {1: own}
    m = ev(1, to_record(global_state))
    assert m["acc-exit-1"] == pytest.approx(share[b])   # scored on its own level's model
    assert m["acc-exit-2"] == pytest.approx(share[a])   # scored on the global model


def test_budget_curve_comes_from_the_best_validation_round():
    strategy = make_strategy({"max-test-samples": 200})
    ev = evaluator_for(strategy)
    y = ev.data.val.y
    share = [float((y == c).float().mean()) for c in range(10)]
    good = constant_heads(strategy.global_state, int(np.argmax(share)))
    bad = constant_heads(strategy.global_state, int(np.argmin(share)))
    ev(1, to_record(good))
    kept = [z.clone() for z in ev.best[1]]
    ev(2, to_record(bad))  # worse on validation: the best round stays round 1
    assert all(torch.equal(k, z) for k, z in zip(kept, ev.best[1]))
    best, final = ev.curve(best=True), ev.curve(best=False)
    assert best[0].accuracy == pytest.approx(float((ev.data.test.y == int(np.argmax(share))).float().mean()))
    assert best != final
