"""Scatter-mean aggregation and reply checks of models/submodel.py on hand-computed numbers."""
import numpy as np
from models.submodel import ElementwiseMean, reply_problems, scatter_mean

def test_elementwise_mean_hand_computed():
    g = {"w": np.zeros((2, 3), np.float32), "n": np.array(7, np.int64),
         "only_global": np.ones(2, np.float32)}
    a = {"w": np.array([[1.0, 2.0]], np.float32), "n": np.array(10, np.int64)}   # slice (1, 2)
    b = {"w": np.array([[3.0, 4.0, 5.0], [6.0, 7.0, 8.0]], np.float32), "n": np.array(20, np.int64)}
    out = scatter_mean(g, [(a, 1.0), (b, 3.0)])
    expected = np.array([[(1 + 9) / 4, (2 + 12) / 4, 5.0], [6.0, 7.0, 8.0]], np.float32)
    np.testing.assert_allclose(out["w"], expected)
    assert out["n"] == round((10 + 60) / 4) and out["n"].dtype == np.int64
    np.testing.assert_array_equal(out["only_global"], g["only_global"])
    assert out["w"].dtype == np.float32


def test_elements_nobody_holds_keep_their_value():
    g = {"w": np.full((3,), 9.0, np.float32)}
    acc = ElementwiseMean(g)
    acc.add({"w": np.array([1.0], np.float32)}, 2.0)
    np.testing.assert_array_equal(acc.result()["w"], [1.0, 9.0, 9.0])


def test_reply_problems_name_every_defect():
    shapes = {"a": (2,), "b": (1, 2)}
    dtypes = {"a": np.dtype(np.float32), "b": np.dtype(np.float32)}
    good = {"a": np.zeros(2, np.float32), "b": np.zeros((1, 2), np.float32)}
    assert reply_problems(good, shapes, dtypes) == []
    assert "outside its spec" in reply_problems({**good, "c": np.zeros(1)}, shapes, dtypes)[0]
    assert "missing" in reply_problems({"a": good["a"]}, shapes, dtypes)[0]
    assert "shape" in reply_problems({**good, "a": np.zeros(3, np.float32)}, shapes, dtypes)[0]
    assert "dtype" in reply_problems({**good, "a": np.zeros(2, np.float64)}, shapes, dtypes)[0]
    bad = {**good, "b": np.array([[np.nan, 0]], np.float32)}
    assert "non-finite" in reply_problems(bad, shapes, dtypes)[0]
