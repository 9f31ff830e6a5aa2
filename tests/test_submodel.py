import numpy as np
import pytest
import torch

from models import EENFamily, ModelConfig, SubmodelSpec
from models.submodel import ElementwiseMean, reply_problems, scatter_mean, slice_state

FAMILIES = {
    "cnn": ModelConfig(num_classes=5, in_chans=1, image_size=16, cnn_width=4),
    "vit": ModelConfig(num_classes=5, in_chans=1, image_size=16, vit_blocks=8, vit_dim=24,
                       vit_heads=4, vit_patch=4),
}


@pytest.mark.parametrize("arch", sorted(FAMILIES))
@pytest.mark.parametrize("spec", [SubmodelSpec(1), SubmodelSpec(3), SubmodelSpec(2, 0.5),
                                  SubmodelSpec(4, 0.75)])
def test_slice_loads_into_submodel_and_scatters_back(arch, spec):
    fam = EENFamily(arch, FAMILIES[arch])
    g = fam.init_state(0)
    sub = slice_state(g, fam.shapes(spec))
    model = fam.build(spec)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sub.items()})  # shapes match
    out = model(fam.example_input(2))
    assert len(out.logits) == spec.depth and len(out.features) == spec.depth
    # scattering the untouched slice back leaves the global state unchanged
    back = scatter_mean(g, [(sub, 3.0)])
    for k in g:
        np.testing.assert_array_equal(back[k], g[k])
    # depth picks names: a depth-d submodel holds exactly the tensors of segments <= d
    assert {fam.segment_of(k) for k in sub} == set(range(1, spec.depth + 1))


def test_width_slices_are_leading_and_narrower():
    fam = EENFamily("cnn", FAMILIES["cnn"])
    full, half = fam.shapes(SubmodelSpec(4)), fam.shapes(SubmodelSpec(4, 0.5))
    assert full.keys() == half.keys()
    w = "blocks.1.0.conv1.weight"
    assert half[w][0] == full[w][0] // 2 and half[w][1] == full[w][1] // 2
    assert half["exits.0.fc.weight"] == (5, full["exits.0.fc.weight"][1] // 2)


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
