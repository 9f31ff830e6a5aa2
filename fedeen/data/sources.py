"""Dataset sources by kind: sklearn digits, Hugging Face hub, local parquet, local npz.

A *source* holds a train and a test ``datasets.Dataset`` (labels, natural ids and a reference
to each input) and turns any subset into tensors, so that a client decodes only its own
partition. Hub datasets are loaded by name for users with a network; the same layouts are read
from local parquet/npz files offline. Each kind of source is one ``register_kind`` entry that
says which ``dataset`` values it serves and how to load them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
import torch

from fedeen.config import ConfigError
from fedeen.data import modalities
from fedeen.data.decoders import decode_image_refs, decode_wav, fit_clip, image_channels

try:  # progress bars of datasets' internal maps would drown the per-round log
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
except ImportError:  # pragma: no cover
    pass

LABEL_COLUMNS = ("label", "labels", "fine_label", "y", "target")
INPUT_COLUMNS = ("img", "image", "images", "pixel_values", "x", "audio")


@dataclass(frozen=True)
class DatasetInfo:
    """What the model and the training loop need to know about a dataset.

    ``hflip``: horizontal flips preserve its labels (natural images). It is a declared
    property of a registered dataset (False for local files), which the run config's
    ``augment-hflip`` can override.
    """

    name: str
    num_classes: int
    modality: str  # a name in fedeen.data.modalities
    in_chans: int
    sample_rate: int = 0
    clip_len: int = 0
    hflip: bool = False


@dataclass(frozen=True)
class HubDataset:
    """A Hugging Face hub dataset with the columns and conventions we need."""

    hub_name: str
    input_column: str
    label_column: str
    test_split: str
    subset: str | None = None
    hflip: bool = False


HUB_DATASETS: dict[str, HubDataset] = {
    "cifar10": HubDataset("uoft-cs/cifar10", "img", "label", "test", hflip=True),
    "cifar100": HubDataset("uoft-cs/cifar100", "img", "fine_label", "test", hflip=True),
    "svhn": HubDataset("ufldl-stanford/svhn", "image", "label", "test", subset="cropped_digits"),
    "speech_commands": HubDataset("google/speech_commands", "audio", "label", "test",
                                  subset="v0.02"),
}


@dataclass
class Tensors:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


class Source:
    """Train/test datasets plus a decoder from a subset to input tensors."""

    def __init__(self, info: DatasetInfo, train, test, label_column: str,
                 decode: Callable[[object], torch.Tensor]) -> None:
        self.info, self.train, self.test = info, train, test
        self.label_column = label_column
        self._decode = decode

    def tensors(self, ds, image_size: int) -> Tensors:
        y = torch.as_tensor(np.asarray(ds[self.label_column]), dtype=torch.long)
        x = modalities.get(self.info.modality).prepare(self._decode(ds), image_size)
        return Tensors(x, y)


# ---------------------------------------------------------------------------- kinds of source
@dataclass(frozen=True)
class SourceKind:
    """``matches(dataset)`` says whether this kind serves a ``dataset`` run-config value;
    ``load(dataset, input_column, label_column)`` builds the source; ``names`` are the
    registered dataset names it serves (listed as valid choices)."""

    name: str
    matches: Callable[[str], bool]
    load: Callable[[str, str, str], Source]
    names: tuple[str, ...] = ()


_KINDS: list[SourceKind] = []


def register_kind(kind: SourceKind) -> SourceKind:
    if any(k.name == kind.name for k in _KINDS):
        raise ValueError(f"source kind {kind.name!r} is already registered")
    _KINDS.append(kind)
    return kind


def dataset_names() -> list[str]:
    return sorted(n for k in _KINDS for n in k.names)


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
                              f"(train.parquet [+ test.parquet], or an .npz) or one of the "
                              f"registered datasets: {', '.join(dataset_names())}")
        return
    if name not in dataset_names():
        raise ConfigError(f"unknown dataset {name!r}; valid datasets: {', '.join(dataset_names())}, "
                          "or an absolute path to a local parquet/npz dataset")


@lru_cache(maxsize=4)
def load_source(dataset: str, input_col: str = "", label_col: str = "") -> Source:
    check_dataset_name(dataset)
    for kind in _KINDS:
        if kind.matches(dataset):
            return kind.load(dataset, input_col, label_col)
    raise ConfigError(f"no source kind reads {dataset!r}; kinds: {[k.name for k in _KINDS]}")


# ---------------------------------------------------------------------------- in-memory arrays
def _from_arrays(name: str, inputs: np.ndarray | list, labels: np.ndarray, info_kw: dict,
                 extra: dict[str, np.ndarray], is_test: np.ndarray | None, seed: int) -> Source:
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
    if info.modality == modalities.AUDIO.name:
        clips = inputs

        def decode(ds) -> torch.Tensor:
            return torch.from_numpy(np.stack([fit_clip(clips[i], info.clip_len)
                                              for i in ds["index"]]).astype(np.float32))
    else:
        images = torch.from_numpy(np.asarray(inputs))

        def decode(ds) -> torch.Tensor:
            return images[torch.as_tensor(np.asarray(ds["index"]))]
    return Source(info, train, test, "label", decode)


def load_digits_source(dataset: str = "digits", input_col: str = "", label_col: str = "") -> Source:
    """scikit-learn's bundled 8x8 digits: real, tiny, always available offline."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return _from_arrays("digits", images, d.target,
                        {"modality": modalities.IMAGE.name, "in_chans": 1}, {}, None, seed=0)


def _npz_file(path: str) -> str | None:
    """The .npz a ``dataset`` path names: the file itself, or the first one in a folder
    that has no train.parquet."""
    if path.endswith(".npz"):
        return path
    if os.path.isdir(path) and not os.path.exists(os.path.join(path, "train.parquet")):
        npz = sorted(f for f in os.listdir(path) if f.endswith(".npz"))
        return os.path.join(path, npz[0]) if npz else None
    return None


def load_npz_source(dataset: str, input_col: str = "", label_col: str = "") -> Source:
    """npz with (images|x, labels|y) or the FSDD audio layout (audio, offsets, label, ...)."""
    path = _npz_file(os.path.expanduser(dataset)) or dataset
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
        return _from_arrays(name, clips, labels, {"modality": modalities.AUDIO.name, "in_chans": 1,
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
                        {"modality": modalities.IMAGE.name, "in_chans": int(images.shape[1])},
                        extra, is_test, 0)


# ---------------------------------------------------------------------------- HF datasets
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


def _num_classes(ds, label_col: str) -> int:
    feature = ds.features[label_col]
    if hasattr(feature, "num_classes"):
        return int(feature.num_classes)
    return int(np.max(np.asarray(ds[label_col]))) + 1


def _hf_source(name: str, train, test, input_col: str, label_col: str, where: str,
               hflip: bool) -> Source:
    """A source over HF datasets whose input column is encoded images or audio files."""
    from datasets import Audio, Image

    columns = list(train.column_names)
    label_col = _pick_column(columns, label_col, LABEL_COLUMNS, "label", where)
    input_col = _pick_column(columns, input_col, INPUT_COLUMNS, "input", where)
    feature = train.features[input_col]
    if isinstance(feature, Audio):
        train, test = (d.cast_column(input_col, Audio(decode=False)) for d in (train, test))
        _, rate = decode_wav(train[0][input_col])
        info = DatasetInfo(name, _num_classes(train, label_col), modalities.AUDIO.name, 1,
                           rate, rate)

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
    info = DatasetInfo(name, _num_classes(train, label_col), modalities.IMAGE.name, chans,
                       hflip=hflip)
    return Source(info, train, test, label_col,
                  lambda ds: decode_image_refs(ds[input_col], chans))


def load_parquet_source(dataset: str, input_col: str = "", label_col: str = "") -> Source:
    from datasets import Dataset

    path = os.path.expanduser(dataset)
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
    return _hf_source(name, train, test, input_col, label_col, path, hflip=False)


def load_hub_source(dataset: str, input_col: str = "", label_col: str = "") -> Source:
    from datasets import load_dataset

    spec = HUB_DATASETS[dataset]
    ds = load_dataset(spec.hub_name, spec.subset)
    return _hf_source(dataset, ds["train"], ds[spec.test_split], input_col or spec.input_column,
                      label_col or spec.label_column, spec.hub_name, spec.hflip)


register_kind(SourceKind("digits", lambda d: d == "digits", load_digits_source, ("digits",)))
register_kind(SourceKind("hub", lambda d: d in HUB_DATASETS, load_hub_source,
                         tuple(HUB_DATASETS)))
register_kind(SourceKind("npz", lambda d: is_path(d) and _npz_file(os.path.expanduser(d)) is not None,
                         load_npz_source))
register_kind(SourceKind("parquet", is_path, load_parquet_source))
