"""Local features (keypoints and their descriptors) of one image, from OpenCV's detectors: SIFT and RootSIFT (the
zero-download default for geometric verification), ORB and AKAZE. Any object with `name`, `settings` and
`__call__(rgb) -> LocalFeatures` is an extractor (`LocalExtractor`); `feature_store` keeps its output per image."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

EXTRACTORS = ("sift", "rootsift", "orb", "akaze")
MAX_KEYPOINTS = 2048    # the strongest keypoints (by detector response) kept per image
MAX_SIDE = 1024         # images are shrunk to this longer side before detection (hloc's default for SuperPoint)


@dataclass(frozen=True)
class LocalFeatures:
    """One image's keypoints, strongest first. Coordinates are pixels of the image as stored (before any
    shrinking), (0, 0) the centre of the top-left pixel: OpenCV's convention and hloc's."""

    keypoints: np.ndarray     # (N, 2) float32 x, y
    descriptors: np.ndarray   # (N, D) float16 unit rows (SIFT, RootSIFT) or uint8 packed bits (ORB, AKAZE)
    scores: np.ndarray        # (N,) float32 detector responses
    image_size: tuple         # (width, height), hloc's order


class LocalExtractor(Protocol):
    """What the feature store and the map build need of an extractor."""

    name: str

    @property
    def settings(self) -> dict: ...

    def __call__(self, rgb: np.ndarray) -> LocalFeatures: ...


class OpenCVExtractor:
    """One of EXTRACTORS. SIFT descriptors are stored L2-normalised, RootSIFT ones L1-normalised then square-rooted
    (unit L2 too, compared by inner product like SIFT), both as float16 (hloc stores its features in half precision
    too); ORB and AKAZE keep OpenCV's packed binary descriptors (uint8, compared by Hamming distance)."""

    def __init__(self, name: str, max_keypoints: int = MAX_KEYPOINTS, max_side: int = MAX_SIDE) -> None:
        if name not in EXTRACTORS:
            raise ValueError(f"unknown local feature extractor {name!r}: expected one of {', '.join(EXTRACTORS)}")
        if max_keypoints < 1 or max_side < 16:
            raise ValueError(f"max_keypoints must be positive and max_side at least 16, got {max_keypoints}, {max_side}")
        self.name, self.max_keypoints, self.max_side = name, int(max_keypoints), int(max_side)
        if name in ("sift", "rootsift"):
            self.detector = cv2.SIFT_create(nfeatures=self.max_keypoints)
        elif name == "orb":
            self.detector = cv2.ORB_create(nfeatures=self.max_keypoints)
        else:
            self.detector = cv2.AKAZE_create()
        self.dim = self.detector.descriptorSize()

    @property
    def settings(self) -> dict:
        return {"max_keypoints": self.max_keypoints, "max_side": self.max_side}

    def __call__(self, rgb: np.ndarray) -> LocalFeatures:
        """Features of an (H, W, 3) uint8 RGB image."""
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got {rgb.dtype}{list(rgb.shape)}")
        height, width = rgb.shape[:2]
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        scale = min(1.0, self.max_side / max(height, width))
        if scale < 1.0:
            gray = cv2.resize(gray, (max(1, round(width * scale)), max(1, round(height * scale))),
                              interpolation=cv2.INTER_AREA)
        points, descriptors = self.detector.detectAndCompute(gray, None)
        binary = self.name in ("orb", "akaze")
        if descriptors is None:
            descriptors = np.zeros((0, self.dim), np.uint8 if binary else np.float32)
        responses = np.array([p.response for p in points], np.float32)
        best = np.argsort(-responses, kind="stable")[:self.max_keypoints]
        xy = np.array([p.pt for p in points], np.float32).reshape(-1, 2)[best]
        if scale < 1.0:   # back to the stored image's pixels, pixel centres aligned
            xy = (xy + 0.5) * (np.array([width, height], np.float32) / gray.shape[::-1]) - 0.5
        descriptors = descriptors[best]
        if not binary:
            descriptors = _normalise(descriptors, root=self.name == "rootsift").astype(np.float16)
        return LocalFeatures(keypoints=xy, descriptors=descriptors, scores=responses[best],
                             image_size=(width, height))


def _normalise(descriptors: np.ndarray, root: bool) -> np.ndarray:
    """SIFT rows L2-normalised, or RootSIFT (L1-normalised, square-rooted: the Hellinger kernel as a dot product)."""
    eps = np.float32(1e-12)
    if root:
        return np.sqrt(descriptors / (np.abs(descriptors).sum(axis=1, keepdims=True) + eps))
    return descriptors / (np.linalg.norm(descriptors, axis=1, keepdims=True) + eps)
