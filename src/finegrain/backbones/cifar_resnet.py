"""ResNet-32 for 32x32 images (He et al., 2016, section 4.2), as in the long-tail literature (Cao et al., 2019).

Three stages of five basic blocks (16, 32, 64 channels), option-A (zero-padded identity) shortcuts, MSRA init.
Registered in timm's model registry, so `create_backbone("resnet32_cifar", pretrained=False)` and
`timm.create_model("resnet32_cifar")` both work; it has no pretrained weights (it is trained from scratch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models import register_model
from torch import nn

CIFAR_CFG = {
    "input_size": (3, 32, 32),
    "mean": (0.4914, 0.4822, 0.4465),
    "std": (0.2470, 0.2435, 0.2616),
    "crop_pct": 1.0,
    "interpolation": "bilinear",
    "num_classes": 10,
    "architecture": "resnet32_cifar",
}


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = cout - cin
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.stride != 1 or self.pad:
            shortcut = x[:, :, :: self.stride, :: self.stride]
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class CifarResNet(nn.Module):
    """stem (conv 3x3, BN, ReLU) -> stages -> global pool -> fc; timm's face: forward_features, reset_classifier."""

    def __init__(self, depth: int = 32, num_classes: int = 10, in_chans: int = 3, **_: object) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        stages, cin = [], 16
        for i, cout in enumerate((16, 32, 64)):
            blocks = [BasicBlock(cin if j == 0 else cout, cout, 2 if (j == 0 and i > 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.num_features = 64
        self.fc = nn.Linear(64, num_classes) if num_classes else nn.Identity()
        self.pretrained_cfg = dict(CIFAR_CFG, num_classes=num_classes)
        self.default_cfg = self.pretrained_cfg
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_out" if isinstance(m, nn.Conv2d) else "fan_in")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.fc = nn.Linear(64, num_classes) if num_classes else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc


@register_model
def resnet32_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    if pretrained:
        raise RuntimeError("resnet32_cifar has no pretrained weights: train it from scratch (pretrained=False)")
    return CifarResNet(32, **kwargs)


@register_model
def resnet20_cifar(pretrained: bool = False, **kwargs) -> CifarResNet:
    if pretrained:
        raise RuntimeError("resnet20_cifar has no pretrained weights: train it from scratch (pretrained=False)")
    return CifarResNet(20, **kwargs)
