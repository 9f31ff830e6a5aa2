"""Early-exit backbones, submodel slicing and the model registry.

Importing the package registers every built-in backbone (``cnn``, ``vit``, ``vit-ree``), so the
registry is complete whatever module of ``models`` is imported first.
"""
from models import cnn, ree, vit  # noqa: F401  (register the built-in backbones)
from models.base import EEOutput, EarlyExitNet, SubmodelSpec
from models.family import EENFamily
from models.registry import ModelConfig, available

__all__ = ["EEOutput", "EarlyExitNet", "SubmodelSpec", "EENFamily", "ModelConfig", "available"]
