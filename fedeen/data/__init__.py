"""Datasets by name or local path, partitioned with flwr-datasets, as ready-to-train tensors.

- ``sources``: the kinds of source (sklearn digits, Hugging Face hub, local parquet, local
  npz), one registration each;
- ``modalities``: image and audio, i.e. how inputs are prepared and augmented and which model
  front end reads them, one registration each;
- ``partition``: the server's hold-out, the clients' partitions and the test set;
- ``decoders``, ``augment``: the helpers they share.
"""
from fedeen.data.modalities import Modality
from fedeen.data.partition import (ClientData, ServerData, hflip_for, load_client_data,
                                   load_server_data, source_for)
from fedeen.data.sources import (DatasetInfo, Source, Tensors, check_dataset_name,
                                 dataset_names, load_source)

__all__ = ["ClientData", "DatasetInfo", "Modality", "ServerData", "Source", "Tensors",
           "check_dataset_name", "dataset_names", "hflip_for", "load_client_data",
           "load_server_data", "load_source", "source_for"]
