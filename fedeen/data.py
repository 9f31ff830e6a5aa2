"""Datasets by name or local path, partitioned with flwr-datasets, as ready-to-train tensors.

A *source* holds a train and a test ``datasets.Dataset`` (labels, natural ids and a reference
to each input) and turns any subset into tensors, so that a client decodes only its own
partition. Hub datasets are loaded by name for users with a network; the same layouts are read
from local parquet/npz files offline. Everything is cached per process: a Ray actor builds its
partition once per run.
"""
from __future__ import annotations

import io
import os
import wave
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

from fedeen.config import ConfigError, RunConfig

try:  # progress bars of datasets' internal maps would drown the per-round log
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
except ImportError:  # pragma: no cover
    pass

LABEL_COLUMNS = ("label", "labels", "fine_label", "y", "target")
INPUT_COLUMNS = ("img", "image", "images", "pixel_values", "x", "audio")


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    modality: str  # "image" or "audio"
    in_chans: int
    sample_rate: int = 0
    clip_len: int = 0
    hflip: bool = False  # horizontal flips are label-preserving (natural images)


@dataclass(frozen=True)
class HubDataset:
    """A Hugging Face hub dataset with the columns and conventions we need."""

    hub_name: str
    input_column: str
    label_column: str
    modality: str
    test_split: str
    subset: str | None = None
    hflip: bool = False
    sample_rate: int = 0


HUB_DATASETS: dict[str, HubDataset] = {
    "cifar10": HubDataset("uoft-cs/cifar10", "img", "label", "image", "test", hflip=True),
    "cifar100": HubDataset("uoft-cs/cifar100", "img", "fine_label", "image", "test", hflip=True),
    "svhn": HubDataset("ufldl-stanford/svhn", "image", "label", "image", "test",
                       subset="cropped_digits"),
    "speech_commands": HubDataset("google/speech_commands", "audio", "label", "audio", "test",
                                  subset="v0.02", sample_rate=16000),
}
BUILTIN = ("digits",)


def dataset_names() -> list[str]:
    return sorted((*BUILTIN, *HUB_DATASETS))


def is_path(name: str) -> bool:
    return os.sep in name or name.startswith(("~", ".")) or name.endswith((".npz", ".parquet"))


def check_dataset_name(name: str) -> None:
    """Fail fast on an unknown name or a missing/relative local path."""
    if is_path(name):
        path = os.path.expanduser(name)
        if not os.path.isabs(path):
            raise ConfigError(f"dataset path must be absolute (the app runs from Flower's app "
                              f"cache, not this folder), got {name!r}")
        if not os.path.exists(path):
            raise ConfigError(f"dataset path {name!r} does not exist; give an existing folder "
                              f"(parquet or npz, laid out as ../shared/data) or one of the "
                              f"registered datasets: {', '.join(dataset_names())}")
        return
    if name not in dataset_names():
        raise ConfigError(f"unknown dataset {name!r}; valid datasets: {', '.join(dataset_names())}, "
                          "or an absolute path to a local parquet/npz dataset")


@dataclass
class Tensors:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def take(self, n: int) -> "Tensors":
        return Tensors(self.x[:n], self.y[:n]) if 0 < n < len(self) else self


class Source:
    """Train/test datasets plus a decoder from a subset to input tensors."""

    def __init__(self, info: DatasetInfo, train, test, label_column: str,
                 decode: Callable[[object], torch.Tensor]) -> None:
        self.info, self.train, self.test = info, train, test
        self.label_column = label_column
        self._decode = decode

    def tensors(self, ds, image_size: int) -> Tensors:
        y = torch.as_tensor(np.asarray(ds[self.label_column]), dtype=torch.long)
        x = self._decode(ds)
        if self.info.modality == "image":
            x = prepare_images(x, image_size)
        return Tensors(x, y)


def prepare_images(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float in [-1, 1] at the model's input size."""
    x = x.float().div_(255.0)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True,
                          align_corners=False)
    return x.sub_(0.5).div_(0.5).contiguous()


def fit_clip(clip: np.ndarray, length: int) -> np.ndarray:
    """Pad with zeros or centre-crop a waveform to ``length`` samples."""
    if len(clip) >= length:
        start = (len(clip) - length) // 2
        return clip[start:start + length]
    return np.pad(clip, (0, length - len(clip)))


# ---------------------------------------------------------------------------- decoders
def _ref_bytes(ref) -> bytes:
    data = ref.get("bytes") if isinstance(ref, dict) else ref
    if data is None:
        with open(ref["path"], "rb") as fh:
            data = fh.read()
    return data


def decode_image_refs(refs: list, in_chans: int) -> torch.Tensor:
    """Encoded images (dicts with bytes/path, raw bytes) -> uint8 (N, C, H, W)."""
    from PIL import Image

    mode = "RGB" if in_chans == 3 else "L"
    arrays = [np.asarray(Image.open(io.BytesIO(_ref_bytes(r))).convert(mode)) for r in refs]
    x = torch.from_numpy(np.stack(arrays))
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()


def decode_wav(ref: dict) -> tuple[np.ndarray, int]:
    data = ref.get("bytes")
    fh = io.BytesIO(data) if data is not None else open(ref["path"], "rb")
    with wave.open(fh) as w:
        frames = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
        return frames.astype(np.float32) / 32768.0, w.getframerate()


def image_channels(ref) -> int:
    """1 for grayscale datasets, else 3 (palette/alpha images are read as RGB)."""
    from PIL import Image

    return 1 if Image.open(io.BytesIO(_ref_bytes(ref))).mode in ("L", "1", "I;16") else 3


# ---------------------------------------------------------------------------- sources
def _from_arrays(name: str, inputs: np.ndarray | list, labels: np.ndarray, info_kw: dict,
                 extra: dict[str, np.ndarray], is_test: np.ndarray, seed: int) -> Source:
    """A source over in-memory arrays; the datasets hold row indices into them."""
    from datasets import Dataset

    labels = np.asarray(labels).astype(np.int64)
    columns = {"index": np.arange(len(labels)), "label": labels,
               **{k: np.asarray(v) for k, v in extra.items()}}
    full = Dataset.from_dict(columns)
    if is_test is None:
        split = full.train_test_split(test_size=0.2, seed=seed)
        train, test = split["train"], split["test"]
    else:
        train = full.select(np.flatnonzero(~is_test))
        test = full.select(np.flatnonzero(is_test))
    info = DatasetInfo(name=name, num_classes=int(labels.max()) + 1, **info_kw)
    if info.modality == "audio":
        clips = inputs

        def decode(ds) -> torch.Tensor:
            return torch.from_numpy(np.stack([fit_clip(clips[i], info.clip_len)
                                              for i in ds["index"]]).astype(np.float32))
    else:
        images = torch.from_numpy(np.asarray(inputs))

        def decode(ds) -> torch.Tensor:
            return images[torch.as_tensor(np.asarray(ds["index"]))]
    return Source(info, train, test, "label", decode)


def load_digits_source() -> Source:
    """scikit-learn's bundled 8x8 digits: real, tiny, always available offline."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return _from_arrays("digits", images, d.target, {"modality": "image", "in_chans": 1},
                        {}, None, seed=0)


def load_npz_source(path: str) -> Source:
    """npz with (images|x, labels|y) or the FSDD audio layout (audio, offsets, label, ...)."""
    arrays = np.load(path, allow_pickle=False)
    keys = set(arrays.files)
    label_key = next((k for k in LABEL_COLUMNS if k in keys), None)
    if label_key is None:
        raise ConfigError(f"{path}: no label array; looked for {LABEL_COLUMNS}, found {sorted(keys)}")
    labels = arrays[label_key]
    extra = {k: arrays[k] for k in keys if k not in (label_key, "audio", "offsets")
             and arrays[k].shape == labels.shape}
    name = os.path.basename(os.path.dirname(path)) or os.path.basename(path)
    if "audio" in keys and "offsets" in keys:
        audio, offsets = arrays["audio"], arrays["offsets"]
        clips = [audio[offsets[i]:offsets[i + 1]].astype(np.float32) / 32768.0
                 for i in range(len(offsets) - 1)]
        rate = int(arrays["sample_rate"]) if "sample_rate" in keys else 16000
        # FSDD's customary test split is takes 0-4; otherwise hold out 20% at random
        is_test = (arrays["take"] < 5) if "take" in keys else None
        return _from_arrays(name, clips, labels, {"modality": "audio", "in_chans": 1,
                                                  "sample_rate": rate, "clip_len": rate},
                            extra, is_test, seed=0)
    image_key = next((k for k in ("images", "image", "x", "img", "data") if k in keys), None)
    if image_key is None:
        raise ConfigError(f"{path}: no image array; looked for images/image/x/img/data, "
                          f"found {sorted(keys)}")
    images = arrays[image_key]
    if images.ndim == 3:
        images = images[:, None]
    elif images.ndim == 4 and images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.transpose(0, 3, 1, 2)
    if images.dtype != np.uint8:
        images = np.clip(np.rint(images * (255.0 if images.max() <= 1.0 else 1.0)), 0, 255)
        images = images.astype(np.uint8)
    is_test = arrays["is_test"].astype(bool) if "is_test" in keys else None
    return _from_arrays(name, np.ascontiguousarray(images), labels,
                        {"modality": "image", "in_chans": int(images.shape[1])}, extra, is_test, 0)


def _pick_column(columns: list[str], wanted: str, candidates: tuple[str, ...], what: str,
                 where: str) -> str:
    if wanted:
        if wanted not in columns:
            raise ConfigError(f"{where}: {what} column {wanted!r} not found; columns: {columns}")
        return wanted
    found = next((c for c in candidates if c in columns), None)
    if found is None:
        raise ConfigError(f"{where}: no {what} column (looked for {', '.join(candidates)}); "
                          f"columns: {columns}; set {what}-column in the run config")
    return found


def _hf_source(name: str, train, test, input_col: str, label_col: str, where: str,
               hflip: bool, sample_rate: int = 0) -> Source:
    """A source over HF datasets whose input column is encoded images or audio files."""
    from datasets import Audio, Image

    columns = list(train.column_names)
    label_col = _pick_column(columns, label_col, LABEL_COLUMNS, "label", where)
    input_col = _pick_column(columns, input_col, INPUT_COLUMNS, "input", where)
    feature = train.features[input_col]
    if isinstance(feature, Audio):
        train, test = (d.cast_column(input_col, Audio(decode=False)) for d in (train, test))
        _, rate = decode_wav(train[0][input_col])
        info = DatasetInfo(name, _num_classes(train, label_col), "audio", 1, rate, rate)

        def decode(ds) -> torch.Tensor:
            return torch.from_numpy(np.stack([fit_clip(decode_wav(r)[0], info.clip_len)
                                              for r in ds[input_col]]))
        return Source(info, train, test, label_col, decode)
    if isinstance(feature, Image):
        train, test = (d.cast_column(input_col, Image(decode=False)) for d in (train, test))
    first = train[0][input_col]
    if not (isinstance(first, (dict, bytes))):
        raise ConfigError(f"{where}: input column {input_col!r} holds {type(first).__name__}, "
                          "expected encoded images (bytes or {bytes, path}) or audio")
    chans = image_channels(first)
    info = DatasetInfo(name, _num_classes(train, label_col), "image", chans, hflip=hflip)
    return Source(info, train, test, label_col,
                  lambda ds: decode_image_refs(ds[input_col], chans))


def _num_classes(ds, label_col: str) -> int:
    feature = ds.features[label_col]
    if hasattr(feature, "num_classes"):
        return int(feature.num_classes)
    return int(np.max(np.asarray(ds[label_col]))) + 1


def load_parquet_source(path: str, input_col: str, label_col: str) -> Source:
    from datasets import Dataset

    if os.path.isdir(path):
        train_p, test_p = os.path.join(path, "train.parquet"), os.path.join(path, "test.parquet")
        if not os.path.exists(train_p):
            raise ConfigError(f"{path}: expected train.parquet (and optionally test.parquet)")
    else:
        train_p, test_p = path, ""
    train = Dataset.from_parquet(train_p)
    if test_p and os.path.exists(test_p):
        test = Dataset.from_parquet(test_p)
    else:
        split = train.train_test_split(test_size=0.2, seed=0)
        train, test = split["train"], split["test"]
    name = os.path.basename(os.path.normpath(path)).removesuffix(".parquet")
    hflip = name.startswith("cifar")
    return _hf_source(name, train, test, input_col, label_col, path, hflip)


def load_hub_source(name: str, input_col: str, label_col: str) -> Source:
    from datasets import load_dataset

    spec = HUB_DATASETS[name]
    ds = load_dataset(spec.hub_name, spec.subset)
    return _hf_source(name, ds["train"], ds[spec.test_split], input_col or spec.input_column,
                      label_col or spec.label_column, spec.hub_name, spec.hflip)


@lru_cache(maxsize=4)
def load_source(dataset: str, input_col: str = "", label_col: str = "") -> Source:
    check_dataset_name(dataset)
    if dataset == "digits":
        return load_digits_source()
    if is_path(dataset):
        path = os.path.expanduser(dataset)
        if os.path.isdir(path):
            npz = sorted(f for f in os.listdir(path) if f.endswith(".npz"))
            if npz and not os.path.exists(os.path.join(path, "train.parquet")):
                return load_npz_source(os.path.join(path, npz[0]))
            return load_parquet_source(path, input_col, label_col)
        if path.endswith(".npz"):
            return load_npz_source(path)
        return load_parquet_source(path, input_col, label_col)
    return load_hub_source(dataset, input_col, label_col)


def source_for(cfg: RunConfig) -> Source:
    return load_source(cfg.dataset, cfg.input_column, cfg.label_column)


# ---------------------------------------------------------------------------- splits
@lru_cache(maxsize=4)
def _client_pool_and_server_val(dataset: str, input_col: str, label_col: str,
                                fraction: float, seed: int):
    """Hold out the server's validation set (exit thresholds, best round) from the train split."""
    src = load_source(dataset, input_col, label_col)
    split = src.train.train_test_split(test_size=fraction, seed=seed)
    return split["train"], split["test"]


def make_partitioner(cfg: RunConfig, num_partitions: int, label_col: str):
    from flwr_datasets.partitioner import (DirichletPartitioner, IidPartitioner,
                                           NaturalIdPartitioner)

    if cfg.partitioner == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if cfg.partitioner == "dirichlet":
        return DirichletPartitioner(num_partitions=num_partitions, partition_by=label_col,
                                    alpha=cfg.alpha, min_partition_size=2, self_balancing=False,
                                    seed=cfg.seed)
    return NaturalIdPartitioner(partition_by=cfg.natural_id)


@lru_cache(maxsize=4)
def _partitioner(cfg: RunConfig, num_partitions: int):
    src = source_for(cfg)
    pool, _ = _client_pool_and_server_val(cfg.dataset, cfg.input_column, cfg.label_column,
                                          cfg.server_val_fraction, cfg.seed)
    if cfg.partitioner == "natural" and cfg.natural_id not in pool.column_names:
        raise ConfigError(f"natural-id column {cfg.natural_id!r} not in dataset {cfg.dataset!r}; "
                          f"columns: {pool.column_names}")
    partitioner = make_partitioner(cfg, num_partitions, src.label_column)
    partitioner.dataset = pool
    if cfg.partitioner == "natural" and partitioner.num_partitions != num_partitions:
        raise ConfigError(f"natural partitioning by {cfg.natural_id!r} gives "
                          f"{partitioner.num_partitions} partitions but the federation has "
                          f"{num_partitions} nodes; run with num-supernodes="
                          f"{partitioner.num_partitions}")
    return partitioner


@dataclass
class ClientData:
    train: Tensors
    val: Tensors


@lru_cache(maxsize=2)
def load_client_data(cfg: RunConfig, partition_id: int, num_partitions: int) -> ClientData:
    """A node's partition, split into train and validation tensors."""
    src = source_for(cfg)
    part = _partitioner(cfg, num_partitions).load_partition(partition_id)
    if cfg.max_samples_per_client and len(part) > cfg.max_samples_per_client:
        part = part.shuffle(seed=cfg.seed).select(range(cfg.max_samples_per_client))
    if cfg.val_fraction > 0 and len(part) >= 5:
        split = part.train_test_split(test_size=cfg.val_fraction, seed=cfg.seed)
        train, val = split["train"], split["test"]
    else:
        train, val = part, part.select([])
    return ClientData(src.tensors(train, cfg.image_size), _tensors_or_empty(src, val, cfg))


def _tensors_or_empty(src: Source, ds, cfg: RunConfig) -> Tensors:
    if len(ds):
        return src.tensors(ds, cfg.image_size)
    return Tensors(torch.empty(0), torch.empty(0, dtype=torch.long))


@dataclass
class ServerData:
    info: DatasetInfo
    val: Tensors
    test: Tensors


def load_server_data(cfg: RunConfig) -> ServerData:
    """The server's validation hold-out and the (optionally capped) test split."""
    src = source_for(cfg)
    _, server_val = _client_pool_and_server_val(cfg.dataset, cfg.input_column, cfg.label_column,
                                                cfg.server_val_fraction, cfg.seed)
    test = src.test
    cap = cfg.max_test_samples
    if cap and len(test) > cap:
        test = test.shuffle(seed=cfg.seed).select(range(cap))
    if cap and len(server_val) > cap:
        server_val = server_val.shuffle(seed=cfg.seed).select(range(cap))
    return ServerData(src.info, src.tensors(server_val, cfg.image_size),
                      src.tensors(test, cfg.image_size))
