"""The global descriptor: a CNN backbone, per-location L2, a NetVLAD layer, optional PCA whitening and a
final L2 (docs/descriptors.md), with its configuration, input preparation and the project's own weight format
(safetensors + JSON). A model's identity is a hash of its configuration and weights, so a map can refuse
queries described by another model."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from ..checkpoint import dataclass_from, read_config, read_tensors, write_checkpoint
from .backbones import EfficientNetLite0, Vgg16Conv5

BACKBONES = ("vgg16", "efficientnet_lite0")
LAYOUTS = ("dk", "kd")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class DescriptorConfig:
    """Everything needed to rebuild a descriptor model besides its weights."""

    name: str = "VGG16-NetVLAD"
    backbone: str = "vgg16"                 # "vgg16" or "efficientnet_lite0"
    backbone_block: int = 15                # efficientnet_lite0: last block used (10: 112-D, 11: 192-D, 15: 320-D)
    clusters: int = 64
    local_dim: int = 512
    assign_bias: bool = False               # pytorch-NetVlad "vladv2" has a bias on the assignment conv
    vlad_layout: str = "dk"                 # flattening: "dk" = hloc/MatConvNet (d*K + k), "kd" = pytorch-NetVlad
    whiten_dim: int | None = 4096           # None: no whitening, the output is the clusters x local_dim VLAD
    input_scale: float = 255.0              # RGB in [0, 1] is multiplied by this, then (x - mean) / std
    mean: tuple = (122.67891434, 116.66876762, 104.00698793)
    std: tuple = (1.0, 1.0, 1.0)
    max_side: int = 1024                    # longer image side is resized down to this
    notes: str = ""

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.vlad_layout not in LAYOUTS:
            raise ValueError(f"vlad_layout must be 'dk' or 'kd', got {self.vlad_layout!r}")
        if self.clusters < 1 or self.local_dim < 1 or (self.whiten_dim is not None and self.whiten_dim < 1):
            raise ValueError("clusters, local_dim and whiten_dim must be positive")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError("mean and std need three values each, std positive")
        if self.max_side < 32:
            raise ValueError(f"max_side must be at least 32, got {self.max_side}")

    @property
    def vlad_dim(self) -> int:
        return self.clusters * self.local_dim

    @property
    def output_dim(self) -> int:
        return self.whiten_dim or self.vlad_dim

    def to_json(self) -> str:
        return json.dumps({"format": "vpr_rerank_ros.descriptor", "version": 1, **asdict(self)}, sort_keys=True)


class NetVLAD(nn.Module):
    """Soft-assignment of L2-normalised local features to K centres, residuals summed per centre,
    intra-normalised, flattened and L2-normalised (Arandjelović et al.; hloc's layer)."""

    def __init__(self, dim: int, clusters: int, layout: str = "dk", bias: bool = False) -> None:
        super().__init__()
        self.assign = nn.Conv1d(dim, clusters, kernel_size=1, bias=bias)
        self.centres = nn.Parameter(torch.zeros(dim, clusters))   # D x K
        self.layout = layout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D, N) local features -> (B, K*D) descriptor."""
        soft = F.softmax(self.assign(x), dim=1)                          # (B, K, N)
        # sum_n a_kn (x_dn - c_dk) without materialising the (B, D, K, N) residuals.
        vlad = torch.einsum("bdn,bkn->bdk", x, soft) - self.centres[None] * soft.sum(-1)[:, None, :]
        vlad = F.normalize(vlad, dim=1)                                  # intra-normalisation per centre
        flat = vlad.flatten(1) if self.layout == "dk" else vlad.transpose(1, 2).flatten(1)
        return F.normalize(flat, dim=1)


class GlobalDescriptor(nn.Module):
    """Image batch (B, 3, H, W) with RGB in [0, 1] -> (B, output_dim) L2-normalised global descriptors."""

    def __init__(self, config: DescriptorConfig) -> None:
        super().__init__()
        self.config = config
        if config.backbone == "vgg16":
            self.backbone: nn.Module = Vgg16Conv5()
        else:
            self.backbone = EfficientNetLite0(config.backbone_block)
        if self.backbone.out_channels != config.local_dim:
            raise ValueError(f"backbone {config.backbone} gives {self.backbone.out_channels}-D features, "
                             f"config says local_dim={config.local_dim}")
        self.netvlad = NetVLAD(config.local_dim, config.clusters, config.vlad_layout, config.assign_bias)
        self.whiten = nn.Linear(config.vlad_dim, config.whiten_dim) if config.whiten_dim else None
        self.register_buffer("mean", torch.tensor(config.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(config.std, dtype=torch.float32).view(1, 3, 1, 1))
        self.backbone.to(memory_format=torch.channels_last)   # faster convolutions on CPU
        self.eval()

    @property
    def output_dim(self) -> int:
        return self.config.output_dim

    def local_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, D, N) L2-normalised dense features."""
        x = ((images * self.config.input_scale - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        return F.normalize(self.backbone(x).flatten(2), dim=1)

    def vlad(self, images: torch.Tensor) -> torch.Tensor:
        """(B, K*D) NetVLAD descriptors before whitening."""
        return self.netvlad(self.local_features(images))

    def finish(self, vlad: torch.Tensor) -> torch.Tensor:
        """NetVLAD vectors -> final descriptors (whitening and L2 when the model whitens)."""
        return F.normalize(self.whiten(vlad), dim=1) if self.whiten is not None else vlad

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.finish(self.vlad(images))

    def weight_tensors(self) -> dict[str, torch.Tensor]:
        """The learnable weights and BN statistics (not the normalisation buffers, which live in the config)."""
        return {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                if k not in ("mean", "std") and not k.endswith("num_batches_tracked")}

    @property
    def identity(self) -> str:
        """SHA-256 of the configuration and weights: equal models have equal identities whatever file they came from."""
        if getattr(self, "_identity", None) is None:
            digest = hashlib.sha256(self.config.to_json().encode())
            digest.update(save_safetensors_bytes(self.weight_tensors()))
            self._identity = digest.hexdigest()
        return self._identity

    def load_weights(self, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Load weights strictly; a mismatch names the missing, unexpected or misshapen keys and the source."""
        expected = {k: v.shape for k, v in self.weight_tensors().items()}
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        shapes = [f"{k}: {tuple(tensors[k].shape)} vs {tuple(expected[k])}" for k in expected
                  if k in tensors and tuple(tensors[k].shape) != tuple(expected[k])]
        if missing or unexpected or shapes:
            problems = [f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
                        f"wrong shapes {shapes[:5]}" if shapes else ""]
            raise ValueError(f"{source}: weights do not fit {self.config.name}: " + "; ".join(p for p in problems if p))
        self.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
        self._identity = None


NORM_TOLERANCE = {"float32": 1e-3, "float16": 1e-2}   # |norm - 1| allowed for stored descriptor rows


def check_unit_rows(rows: np.ndarray, dtype: str, source: str, labels=None) -> None:
    """Refuse descriptor rows that are not finite or not L2-normalised within the tolerance of the type they
    are stored in, naming `source` and the first bad row (by `labels[i]` when given)."""
    norms = np.linalg.norm(np.asarray(rows, np.float32), axis=1)
    bad = np.flatnonzero(~np.isfinite(norms) | (np.abs(norms - 1.0) > NORM_TOLERANCE[dtype]))
    if bad.size:
        first = repr(str(labels[bad[0]])) if labels is not None else f"row {bad[0]}"
        raise ValueError(f"{source} must be finite (no NaN or inf) and L2-normalised: {first} has norm {norms[bad[0]]:.4f} "
                         f"({bad.size} rows off by more than {NORM_TOLERANCE[dtype]})")


def prepare_image(rgb: np.ndarray, max_side: int) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H', W') float tensor in [0, 1], the longer side at most `max_side`."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.dtype}{list(rgb.shape)}")
    h, w = rgb.shape[:2]
    scale = max_side / max(h, w)
    if scale < 1.0:
        rgb = cv2.resize(rgb, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    return torch.from_numpy(np.require(rgb, requirements=["C", "W"])).permute(2, 0, 1).float().div_(255.0)


DESCRIPTOR_FORMAT = "vpr_rerank_ros.descriptor"


def save_model(model: GlobalDescriptor, path: str | Path) -> Path:
    """Write `<stem>.safetensors` and `<stem>.json` (the config, with the identity for reference)."""
    return write_checkpoint(path, model.weight_tensors(), DESCRIPTOR_FORMAT,
                            {**asdict(model.config), "identity": model.identity})


def load_native(path: str | Path) -> GlobalDescriptor:
    """Read the project's own format: `<stem>.safetensors` + `<stem>.json`."""
    data = read_config(path, DESCRIPTOR_FORMAT)
    stated = data.pop("identity", None)
    data = {k: tuple(v) if k in ("mean", "std") else v for k, v in data.items()}
    model = GlobalDescriptor(dataclass_from(DescriptorConfig, data, str(path)))
    model.load_weights(read_tensors(path), str(path))
    if stated is not None and stated != model.identity:
        raise ValueError(f"{path}: weights or config changed since it was written (identity mismatch)")
    return model
