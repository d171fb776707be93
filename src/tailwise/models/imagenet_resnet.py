"""ImageNet ResNet-18/50 from torchvision (random init; weights are never downloaded)."""
from __future__ import annotations

from torch import nn

from .cifar_resnet import NormedLinear
from .registry import register_model


def _build(name: str, num_classes: int, normed_head: bool) -> nn.Module:
    import torchvision  # here, not at module level: importing it costs seconds (torch._dynamo) on every CLI call

    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if normed_head:
        model.fc = NormedLinear(model.fc.in_features, num_classes)
    return model


@register_model("resnet18")
def resnet18(num_classes: int = 1000, normed_head: bool = False) -> nn.Module:
    return _build("resnet18", num_classes, normed_head)


@register_model("resnet50")
def resnet50(num_classes: int = 1000, normed_head: bool = False) -> nn.Module:
    return _build("resnet50", num_classes, normed_head)
