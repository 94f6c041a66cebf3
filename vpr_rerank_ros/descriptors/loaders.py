"""Weight loaders for the checkpoints users bring, each producing the same in-memory `GlobalDescriptor`:

1. hloc's MatConvNet struct export (`Pitts30K_struct.mat`, `TokyoTM_struct.mat`): read with
   `scipy.io.loadmat(struct_as_record=False, squeeze_me=True)`; `net.layers[i].weights = {W (S x S x IN x OUT), b}`
   for the VGG16 convolutions (layers 0..28), layer 30 = NetVLAD (assignment D x K, *negated* centres D x K),
   layer 33 = whitening (1 x 1 x IN x OUT, bias), `net.meta.normalization.averageImage` = the mean.
2. Nanne/pytorch-NetVlad checkpoints: `state_dict` with `encoder.<n>.weight/bias` (VGG16 features),
   `pool.conv.weight` (K x D x 1 x 1, `pool.conv.bias` for vladv2), `pool.centroids` (K x D) and optionally
   `WPCA.0.weight/bias` (P x K*D x 1 x 1) as Patch-NetVLAD adds; loaded with `weights_only=True`.
3. The project's own safetensors + JSON (`model.load_native`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .model import IMAGENET_MEAN, IMAGENET_STD, DescriptorConfig, GlobalDescriptor, load_native, save_model

MATCONVNET_NETVLAD_LAYER = 30
MATCONVNET_WHITEN_LAYER = 33


def load_model(path: str | Path) -> GlobalDescriptor:
    """Load descriptor weights in any supported format, chosen by the file name."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".safetensors"):
        return load_native(path)
    if name.endswith(".mat"):
        return load_matconvnet(path)
    if name.endswith((".pth", ".pth.tar", ".tar", ".pt", ".ckpt")):
        return load_pytorch_netvlad(path)
    raise ValueError(f"{path}: unknown weights format (expected .safetensors, .mat, or a torch .pth/.pth.tar/.pt)")


def load_matconvnet(path: str | Path, whiten: bool = True) -> GlobalDescriptor:
    """hloc's VGG16-NetVLAD MatConvNet struct (`.mat`)."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        net = loadmat(path, struct_as_record=False, squeeze_me=True)["net"]
        layers = list(net.layers)
    except (MatReadError, NotImplementedError, KeyError, AttributeError, ValueError, TypeError) as exc:
        # MatReadError: not a .mat file at all (empty, truncated, text); NotImplementedError: MATLAB v7.3 (HDF5)
        raise ValueError(f"{path}: not a MatConvNet struct export with net.layers ({type(exc).__name__}: "
                         f"{exc})") from None
    if len(layers) <= MATCONVNET_NETVLAD_LAYER:
        raise ValueError(f"{path}: {len(layers)} layers, a VGG16-NetVLAD export has at least 31")
    assignment = np.asarray(layers[MATCONVNET_NETVLAD_LAYER].weights[0], np.float32)        # D x K
    centres = -np.asarray(layers[MATCONVNET_NETVLAD_LAYER].weights[1], np.float32)          # stored negated
    w_whiten = b_whiten = None
    if whiten and len(layers) > MATCONVNET_WHITEN_LAYER:
        w_whiten = np.asarray(layers[MATCONVNET_WHITEN_LAYER].weights[0], np.float32)
        w_whiten = w_whiten.reshape(-1, w_whiten.shape[-1]).T                               # OUT x IN
        b_whiten = np.asarray(layers[MATCONVNET_WHITEN_LAYER].weights[1], np.float32).reshape(-1)
    mean = np.asarray(net.meta.normalization.averageImage, np.float64)
    mean = mean[0, 0] if mean.ndim == 3 else mean.reshape(-1)
    config = DescriptorConfig(name=path.stem, backbone="vgg16", clusters=assignment.shape[1],
                              local_dim=assignment.shape[0], vlad_layout="dk",
                              whiten_dim=None if w_whiten is None else w_whiten.shape[0], input_scale=255.0,
                              mean=tuple(float(m) for m in mean), std=(1.0, 1.0, 1.0),
                              notes=f"converted from MatConvNet {path.name}")
    model = GlobalDescriptor(config)
    tensors = {}
    convs = [i for i, m in enumerate(model.backbone) if isinstance(m, torch.nn.Conv2d)]
    for i in convs:
        weights = getattr(layers[i], "weights", None)
        if weights is None or len(weights) != 2:
            raise ValueError(f"{path}: layer {i} should be a convolution with weights and bias")
        tensors[f"backbone.{i}.weight"] = torch.from_numpy(np.asarray(weights[0], np.float32)).permute(3, 2, 0, 1)
        tensors[f"backbone.{i}.bias"] = torch.from_numpy(np.asarray(weights[1], np.float32).reshape(-1))
    tensors["netvlad.assign.weight"] = torch.from_numpy(assignment.T.copy()).unsqueeze(-1)
    tensors["netvlad.centres"] = torch.from_numpy(centres.copy())
    if w_whiten is not None:
        tensors["whiten.weight"] = torch.from_numpy(w_whiten.copy())
        tensors["whiten.bias"] = torch.from_numpy(b_whiten.copy())
    model.load_weights(tensors, str(path))
    return model


def load_pytorch_netvlad(path: str | Path) -> GlobalDescriptor:
    """A Nanne/pytorch-NetVlad (or Patch-NetVLAD) VGG16 checkpoint; torch.load with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, zip errors, unsafe globals
        raise ValueError(f"{path}: not a loadable torch checkpoint with plain tensors ({exc})") from exc
    state = checkpoint.get("state_dict", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or "pool.centroids" not in {k.removeprefix("module.") for k in state}:
        raise ValueError(f"{path}: no pytorch-NetVlad state_dict (pool.centroids not found)")
    state = {k.removeprefix("module.").replace(".module.", "."): v for k, v in state.items()}
    centroids = state["pool.centroids"]                                      # K x D
    clusters, dim = centroids.shape
    pca_weight = state.get("WPCA.0.weight")
    config = DescriptorConfig(name=path.name.split(".")[0], backbone="vgg16", clusters=clusters, local_dim=dim,
                              assign_bias="pool.conv.bias" in state, vlad_layout="kd",
                              whiten_dim=None if pca_weight is None else pca_weight.shape[0], input_scale=1.0,
                              mean=IMAGENET_MEAN, std=IMAGENET_STD,
                              notes=f"converted from pytorch-NetVlad {path.name}")
    model = GlobalDescriptor(config)
    tensors = {f"backbone.{k.removeprefix('encoder.')}": v for k, v in state.items() if k.startswith("encoder.")}
    tensors["netvlad.assign.weight"] = state["pool.conv.weight"].reshape(clusters, dim, 1)
    if config.assign_bias:
        tensors["netvlad.assign.bias"] = state["pool.conv.bias"]
    tensors["netvlad.centres"] = centroids.T.contiguous()
    if pca_weight is not None:
        tensors["whiten.weight"] = pca_weight.reshape(pca_weight.shape[0], -1)
        tensors["whiten.bias"] = state["WPCA.0.bias"]
    model.load_weights(tensors, str(path))
    return model


def convert(source: str | Path, target: str | Path) -> GlobalDescriptor:
    """Load weights in any supported format and write them in the project's format."""
    model = load_model(source)
    save_model(model, target)
    return model
