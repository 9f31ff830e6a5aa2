"""Early-exit backbones, submodel slicing and the model registry.

Importing the package registers every built-in backbone (``cnn``, ``vit``, ``vit-ree``,
``vgg16``, ``resnet18``), so the registry is complete whatever module of ``models`` is
imported first.
"""
from models import cnn, ree, torchvision_een, vit  # noqa: F401  (register the built-ins)
from models.base import EEOutput, EarlyExitNet, SubmodelSpec
from models.family import EENFamily
from models.registry import ModelConfig, available

__all__ = ["EEOutput", "EarlyExitNet", "SubmodelSpec", "EENFamily", "ModelConfig", "available"]
