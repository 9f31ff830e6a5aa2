"""Robust aggregation (coordinate-wise median, trimmed mean) and the update-norm bound, on
hand-computed numbers and against a client that sends huge, finite weights."""
import numpy as np
import pytest

from inprocess import HostileGrid, make_strategy, set_matrix, train_round, with_arrays
from models.submodel import scale_update, scatter_median, scatter_trimmed_mean, update_norm

FAST = {"num-server-rounds": 1, "max-samples-per-client": 40, "max-test-samples": 40}

pytestmark = pytest.mark.usefixtures("one_thread")


def test_median_and_trimmed_mean_over_the_holders_of_each_element():
    g = {"w": np.zeros((2, 3), np.float32), "n": np.array(0, np.int64)}
    a = {"w": np.array([[1, 2]], np.float32), "n": np.array(4, np.int64)}        # slice (1, 2)
    b = {"w": np.array([[3, 4, 5], [6, 7, 8]], np.float32), "n": np.array(6, np.int64)}
    c = {"w": np.array([[100, -50, 9], [1, 1, 1]], np.float32), "n": np.array(100, np.int64)}
    med = scatter_median(g, [a, b, c])
    np.testing.assert_array_equal(med["w"], [[3, 2, 7], [3.5, 4, 4.5]])  # 3 holders, then 2
    assert med["n"] == 6 and med["n"].dtype == np.int64
    trimmed = scatter_trimmed_mean(g, [a, b, c], 0.34)  # m = 3: drop 1 each side; m = 2: none
    np.testing.assert_array_equal(trimmed["w"], [[3, 2, 7], [3.5, 4, 4.5]])
    none_trimmed = scatter_trimmed_mean(g, [a, b, c], 0.0)
    np.testing.assert_allclose(none_trimmed["w"][0], [104 / 3, -44 / 3, 7])
    untouched = scatter_median({"z": np.full(2, 5.0, np.float32), **g}, [a])
    np.testing.assert_array_equal(untouched["z"], [5.0, 5.0])  # nobody holds it


def test_update_norm_and_scaling():
    ref = {"w": np.zeros(2, np.float32), "i": np.array(3, np.int64)}
    new = {"w": np.array([3.0, 4.0], np.float32), "i": np.array(9, np.int64)}
    assert update_norm(new, ref) == pytest.approx(5.0)  # integer buffers do not count
    half = scale_update(new, ref, 0.5)
    np.testing.assert_allclose(half["w"], [1.5, 2.0])
    assert half["i"] == 9


def huge_round(rc):
    strategy = make_strategy(rc)
    before = {k: v.copy() for k, v in strategy.global_state.items()}
    _, (arrays, metrics) = train_round(strategy, HostileGrid(rc, with_arrays(set_matrix(1e30))))
    state = {k: a.numpy() for k, a in arrays.items()}
    return max(float(np.abs(state[k] - before[k]).max()) for k in state
               if state[k].dtype.kind == "f"), metrics


@pytest.mark.parametrize("rc", [{"aggregation": "median"},
                                {"aggregation": "trimmed-mean", "trim-fraction": 0.25},
                                {"update-norm-bound": 3.0}],
                         ids=["median", "trimmed-mean", "norm-bound"])
def test_a_client_with_huge_finite_weights_cannot_take_over_the_model(rc):
    plain, _ = huge_round(FAST)
    assert plain > 1e28  # the mean follows it
    robust, metrics = huge_round({**FAST, **rc})
    assert robust < 10.0 and metrics["clients-ok"] == 4
