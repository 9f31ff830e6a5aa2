import numpy as np
import pytest
import torch

from conftest import needs_shared
from fedeen.app_config import load_config
from fedeen.config import ConfigError
from fedeen.data import load_client_data, load_server_data, load_source, source_for


def test_digits_is_the_offline_default():
    cfg = load_config({})
    src = source_for(cfg)
    assert (src.info.num_classes, src.info.modality, src.info.in_chans) == (10, "image", 1)
    parts = [load_client_data(cfg, i, 4) for i in range(4)]
    server = load_server_data(cfg)
    total = sum(len(p.train) + len(p.val) for p in parts) + len(server.val)
    assert total == len(src.train)
    x = parts[0].train.x
    assert x.shape[1:] == (1, 32, 32) and x.min() >= -1 and x.max() <= 1


def test_local_npz_images_any_size_and_classes(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "toy.npz"
    np.savez(path, x=rng.integers(0, 255, (40, 12, 12, 3), dtype=np.uint8),
             y=np.repeat(np.arange(5), 8))
    cfg = load_config({"dataset": str(path), "image-size": 16, "partitioner": "iid"})
    src = source_for(cfg)
    assert (src.info.num_classes, src.info.in_chans) == (5, 3)
    data = load_client_data(cfg, 0, 2)
    assert data.train.x.shape[1:] == (3, 16, 16)


def test_npz_without_labels_names_what_it_found(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, pixels=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(ConfigError, match="no label array.*pixels"):
        load_source(str(path))


def test_parquet_without_image_column_names_the_columns(tmp_path):
    from datasets import Dataset

    path = tmp_path / "noimg.parquet"
    Dataset.from_dict({"foo": [1, 2, 3], "label": [0, 1, 0]}).to_parquet(str(path))
    with pytest.raises(ConfigError, match=r"no input column.*\['foo', 'label'\]"):
        load_source(str(path))


def test_local_cifar10_parquet_dirichlet():
    path = needs_shared("cifar10")
    cfg = load_config({"dataset": str(path), "alpha": 0.1, "max-samples-per-client": 50,
                       "max-test-samples": 64})
    src = source_for(cfg)
    assert (src.info.num_classes, src.info.in_chans) == (10, 3)
    assert len(src.train) == 50_000 and len(src.test) == 10_000
    data = load_client_data(cfg, 1, 10)
    assert data.train.x.shape[1:] == (3, 32, 32) and len(data.train) + len(data.val) <= 50
    server = load_server_data(cfg)
    assert len(server.test) == 64


def test_fsdd_audio_natural_split_by_speaker():
    path = needs_shared("fsdd")
    cfg = load_config({"dataset": str(path), "partitioner": "natural", "natural-id": "speaker"})
    src = source_for(cfg)
    assert (src.info.modality, src.info.sample_rate, src.info.num_classes) == ("audio", 8000, 10)
    assert len(src.test) == 300  # takes 0-4
    data = load_client_data(cfg, 0, 6)
    assert data.train.x.shape[1] == 8000
    with pytest.raises(ConfigError, match="num-supernodes=6"):
        load_client_data(cfg, 0, 4)


def test_audio_model_consumes_waveforms():
    from models import EENFamily, ModelConfig
    from models.cnn import CNNOptions

    fam = EENFamily("cnn", ModelConfig(num_classes=10, frontend="logmel", sample_rate=8000,
                                        backbone=CNNOptions(width=4)))
    out = fam.build()(torch.randn(3, 8000))
    assert len(out.logits) == 4 and out.logits[-1].shape == (3, 10)
    assert not any("frontend" in k for k in fam.shapes())  # the front end holds no state


def test_unknown_natural_id_column():
    cfg = load_config({"partitioner": "natural", "natural-id": "writer"})
    with pytest.raises(ConfigError, match="natural-id column 'writer'"):
        load_client_data(cfg, 0, 4)


def test_flips_are_a_declared_property_or_a_setting_never_a_name(tmp_path):
    from fedeen.data import hflip_for
    from fedeen.data.sources import HUB_DATASETS

    folder = tmp_path / "cifar10"  # a name that once implied flips
    folder.mkdir()
    rng = np.random.default_rng(0)
    np.savez(folder / "data.npz", images=rng.integers(0, 255, (20, 3, 8, 8), dtype=np.uint8),
             labels=np.arange(20) % 2)
    info = source_for(load_config({"dataset": str(folder)})).info
    assert not hflip_for(load_config({"dataset": str(folder)}), info)
    assert hflip_for(load_config({"dataset": str(folder), "augment-hflip": "true"}), info)
    assert HUB_DATASETS["cifar10"].hflip and not HUB_DATASETS["svhn"].hflip
