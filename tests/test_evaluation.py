import numpy as np
import torch

from fedeen.evaluation import budget_curve, exit_accuracies, fit_thresholds, quotas, route


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
