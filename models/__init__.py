"""Early-exit backbones, submodel slicing and the model registry."""
from models.base import EEOutput, EarlyExitNet, SubmodelSpec
from models.family import EENFamily
from models.registry import ModelConfig, available

__all__ = ["EEOutput", "EarlyExitNet", "SubmodelSpec", "EENFamily", "ModelConfig", "available"]
