"""Model zoo: CIFAR ResNets (He et al. 2016) and torchvision ImageNet ResNets behind a small registry."""
from .registry import build_model, list_models, register_model
from .cifar_resnet import NormedLinear  # importing registers resnet20/32/56
from . import imagenet_resnet as _imagenet_resnet  # noqa: F401  (registers resnet18/50)

__all__ = ["build_model", "list_models", "register_model", "NormedLinear"]
