"""CIFAR ResNet-20/32/56 (He et al. 2016, §4.2) with projection (option B) shortcuts.

Stem: 3x3 conv (16) + BN + ReLU; three stages of ``n`` BasicBlocks with widths 16/32/64, stride 2 at the first
block of stages 2 and 3; global average pool; classifier ``fc``. Depth = 6n + 2. Shortcuts are identity when
shapes match, otherwise ``nn.Sequential(1x1 conv stride 2 no bias, BN)`` so every channel is structurally
prunable.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_model


class NormedLinear(nn.Module):
    """Cosine classifier of LDAM-DRW (Cao et al. 2019): ``normalize(x, dim=1) @ normalize(W, dim=0)``.

    ``weight`` has shape ``(in_features, out_features)`` (transposed w.r.t. ``nn.Linear``) and no bias;
    outputs are cosines in ``[-1, 1]``.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.weight = nn.Parameter(torch.empty(self.in_features, self.out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1).mm(F.normalize(self.weight, dim=0))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, num_blocks: int, num_classes: int = 10, widths=(16, 32, 64), normed_head: bool = False):
        super().__init__()
        self.num_blocks = int(num_blocks)
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        stages = []
        for i, width in enumerate(widths):
            blocks = []
            for j in range(self.num_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, width, stride))
                in_planes = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = NormedLinear(in_planes, num_classes) if normed_head else nn.Linear(in_planes, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features, shape (N, 64)."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


@register_model("resnet20")
def resnet20(num_classes: int = 10, normed_head: bool = False) -> CifarResNet:
    return CifarResNet(3, num_classes, normed_head=normed_head)


@register_model("resnet32")
def resnet32(num_classes: int = 10, normed_head: bool = False) -> CifarResNet:
    return CifarResNet(5, num_classes, normed_head=normed_head)


@register_model("resnet56")
def resnet56(num_classes: int = 10, normed_head: bool = False) -> CifarResNet:
    return CifarResNet(9, num_classes, normed_head=normed_head)
