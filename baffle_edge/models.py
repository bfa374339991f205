"""Models of the BAFFLE reference setup (LeNet, WideResNet-10-2, a small MLP) and a mobile-class one.

All of them avoid BatchNorm (running statistics do not fit a forward-only scheme): use
GroupNorm (``affine=False`` as in the reference, so it adds no trainable parameters) or no
normalisation. ``build_model`` is the one entry point; ``check_model`` refuses BatchNorm.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import MODEL_NAMES, Activation, ModelConfig, Norm, default_norm  # noqa: F401 (the model's names)


def _act(kind: Activation) -> nn.Module:
    return nn.Hardswish() if Activation(kind) is Activation.HARDSWISH else nn.ReLU()


def _norm(kind: Norm, channels: int) -> nn.Module:
    if Norm(kind) is Norm.NONE:
        return nn.Identity()
    return nn.GroupNorm(max(2, channels // 16), channels, affine=False)  # reference grouping


class LeNet(nn.Module):
    """conv5x5 -> act -> maxpool2 -> conv5x5 -> act -> global avg pool -> linear.

    Padding 2 keeps the reference shape valid from 8x8 (digits) to 32x32 (CIFAR); with
    channels (16, 64) and one input channel it has 26,730 parameters, as in the paper.
    """

    def __init__(self, cfg: ModelConfig, channels: tuple[int, int] = (16, 64)):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(cfg.in_channels, c1, 5, padding=2), _norm(cfg.norm, c1), _act(cfg.activation),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5, padding=2), _norm(cfg.norm, c2), _act(cfg.activation),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(c2, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class WideBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, cfg: ModelConfig):
        super().__init__()
        self.pre = nn.Sequential(_norm(cfg.norm, cin), _act(cfg.activation))
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.post = nn.Sequential(_norm(cfg.norm, cout), _act(cfg.activation))
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                         if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.pre(x)
        y = self.conv2(self.post(self.conv1(o)))
        return y + (self.shortcut(o) if not isinstance(self.shortcut, nn.Identity) else x)


class WideResNet(nn.Module):
    """Pre-activation WideResNet-depth-width (Zagoruyko & Komodakis), GroupNorm by default."""

    def __init__(self, cfg: ModelConfig, depth: int = 10, width: int = 2):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, widths[0], 3, 1, 1, bias=False)]
        for stage in range(3):
            for i in range(n):
                cin = widths[stage] if i == 0 else widths[stage + 1]
                layers.append(WideBlock(cin, widths[stage + 1], 1 if stage == 0 or i else 2, cfg))
        layers += [_norm(cfg.norm, widths[3]), _act(cfg.activation), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(widths[3], cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class MLP(nn.Module):
    """Flatten -> linear -> act -> linear: the smallest model, for quick checks."""

    def __init__(self, cfg: ModelConfig, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(cfg.in_channels * cfg.image_size**2, hidden), _act(cfg.activation),
            nn.Linear(hidden, cfg.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MobileNet(nn.Module):
    """A MobileNet-v1-style net of depthwise-separable blocks (Howard et al. 2017) for 8x8 to 32x32 inputs.

    stem conv3x3 -> act -> [depthwise conv3x3 (stride s) -> act -> pointwise conv1x1 -> act] x 4 ->
    global avg pool -> linear. Channels 32 -> 64 -> 128 -> 256 -> 256, strides 2, 2, 2, 1: 116,938
    parameters for one input channel. Without normalisation (the default) it is a *chain* of modules
    whose outputs pass through channel-wise ops only, so block noise evaluates a row from cached
    activations (export/blocks.py): a depthwise channel's delta stays in its channel until the next
    pointwise conv mixes it. ``norm=group`` adds GroupNorm after every conv (rows then run as full forwards).
    """

    STAGES = ((64, 2), (128, 2), (256, 2), (256, 1))  # (pointwise output channels, depthwise stride)

    def __init__(self, cfg: ModelConfig, stem: int = 32):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(cfg.in_channels, stem, 3, padding=1), _norm(cfg.norm, stem),
                                   _act(cfg.activation)]
        c = stem
        for cout, stride in self.STAGES:
            layers += [nn.Conv2d(c, c, 3, stride, 1, groups=c), _norm(cfg.norm, c), _act(cfg.activation),
                       nn.Conv2d(c, cout, 1), _norm(cfg.norm, cout), _act(cfg.activation)]
            c = cout
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c, cfg.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def check_model(model: nn.Module) -> nn.Module:
    """Refuse modules whose running statistics cannot be handled by forward-only training."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise ValueError(
                f"module {name!r} is {type(module).__name__}: BatchNorm keeps running statistics that "
                "perturbed forward passes would corrupt; use GroupNorm (norm='group') or no norm"
            )
    return model


def build_model(cfg: ModelConfig, *, seed: int = 0) -> nn.Module:
    """Build the model named by ``cfg.name`` with weights initialised from ``seed``."""
    makers = {"lenet": LeNet, "wrn-10-2": WideResNet, "mlp": MLP, "mobilenet": MobileNet}
    if cfg.name not in makers:
        raise ValueError(f"unknown model {cfg.name!r}; known: {', '.join(MODEL_NAMES)}")
    cfg = ModelConfig(cfg.name, cfg.in_channels, cfg.image_size, cfg.num_classes,
                      Activation(cfg.activation), Norm(cfg.norm))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = makers[cfg.name](cfg)
    return check_model(model.eval())
