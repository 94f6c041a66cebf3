"""Spatial verification of retrieval candidates, without ROS and whatever extracted the features: match local
descriptors (mutual nearest neighbours + Lowe's ratio test), fit a two-view model with OpenCV's USAC/MAGSAC,
count inliers for the top N candidates in parallel threads, and re-rank by global similarity plus geometric
evidence, only when a per-query trigger says the evidence is strong and decisive (docs/reranking.md)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from functools import cache
from typing import Sequence

import cv2
import numpy as np
from threadpoolctl import ThreadpoolController

# The fewest matches each model is fitted from; fewer give 0 inliers.
MIN_MATCHES = {"homography": 4, "fundamental": 8}


@dataclass(frozen=True)
class Features:
    """One image's local features prepared for matching (make with `Features.from_arrays`).

    keypoints  (N, 2) float32 pixel coordinates x, y
    vectors    (N, D) float32: float descriptors L2-normalised, or binary descriptors' bits as 0 / 1
    bits       (N,) float32 set bits per binary descriptor (its squared norm); None for float descriptors
    """

    keypoints: np.ndarray
    vectors: np.ndarray
    bits: np.ndarray | None = None

    @classmethod
    def from_arrays(cls, keypoints: np.ndarray, descriptors: np.ndarray, binary: bool = False) -> "Features":
        """From (N, 2) keypoints and (N, D) descriptors: float (SIFT, RootSIFT, ...) matched by L2 distance, or with
        `binary` (N, bytes) uint8 packed bits (ORB, AKAZE) matched by Hamming distance."""
        keypoints, descriptors = np.asarray(keypoints), np.asarray(descriptors)
        if keypoints.ndim != 2 or keypoints.shape[1] != 2 or descriptors.ndim != 2 \
                or len(descriptors) != len(keypoints):
            raise ValueError(f"expected keypoints (N, 2) and descriptors (N, D), got {keypoints.shape} and "
                             f"{descriptors.shape}")
        points = np.ascontiguousarray(keypoints, dtype=np.float32)
        if binary:
            if descriptors.dtype != np.uint8:
                raise ValueError(f"binary descriptors must be packed uint8, got {descriptors.dtype}")
            vectors = np.unpackbits(descriptors, axis=1).astype(np.float32)
            return cls(points, vectors, vectors.sum(1))
        vectors = descriptors.astype(np.float32)
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return cls(points, vectors)

    @classmethod
    def of(cls, features) -> "Features":
        """From an extractor's or a features file's `local_features.LocalFeatures` (uint8 descriptors: binary)."""
        descriptors = features.descriptors
        return cls.from_arrays(features.keypoints, descriptors, binary=descriptors.dtype == np.uint8)

    def __len__(self) -> int:
        return len(self.keypoints)

    @property
    def binary(self) -> bool:
        return self.bits is not None


def match(query: Features, candidate: Features, ratio: float = 0.8) -> np.ndarray:
    """(M, 2) index pairs (query row, candidate row), by query row: mutual nearest neighbours whose nearest
    distance is below `ratio` times the second nearest (Lowe; a candidate with one feature has no second)."""
    if query.binary != candidate.binary or query.vectors.shape[1] != candidate.vectors.shape[1]:
        raise ValueError("query and candidate descriptors are of different kinds or sizes")
    if len(query) == 0 or len(candidate) == 0:
        return np.empty((0, 2), np.int64)
    similarity = query.vectors @ candidate.vectors.T   # unit vectors: 1 - d^2 / 2
    if query.binary:                                   # bits: x.y - (|x|^2 + |y|^2) / 2 + 1 = 1 - hamming / 2
        similarity += 1.0 - (query.bits[:, None] + candidate.bits[None, :]) / 2
    rows = np.arange(len(query))
    nearest = similarity.argmax(1)
    best = similarity[rows, nearest]
    mutual = best >= similarity.max(0)[nearest]        # a strided argmax(0) costs 20x more than max(0)
    similarity[rows, nearest] = -np.inf
    second = similarity.max(1)
    d1, d2 = (np.maximum(2.0 - 2.0 * s, 0.0) for s in (best, second))   # squared L2, or Hamming for bits
    if not query.binary:
        d1, d2 = np.sqrt(d1), np.sqrt(d2)
    keep = mutual & (d1 < ratio * d2)
    pairs = np.stack([rows[keep], nearest[keep]], axis=1)
    _, first = np.unique(pairs[:, 1], return_index=True)   # exact ties: one query row per candidate row
    return pairs[np.sort(first)]


@dataclass(frozen=True)
class Fit:
    """A robust two-view fit: inlier count, (M,) inlier mask over the matches, 3x3 model (None: no fit)."""

    inliers: int
    mask: np.ndarray
    matrix: np.ndarray | None


def fit(points_query: np.ndarray, points_candidate: np.ndarray, model: str = "fundamental",
        threshold: float = 3.0, confidence: float = 0.999, max_iters: int = 2000) -> Fit:
    """USAC/MAGSAC fit of a homography or fundamental matrix to (M, 2) matched points, `threshold` the largest
    residual in pixels. Too few matches or a degenerate sample give 0 inliers, never an exception."""
    if model not in MIN_MATCHES:
        raise ValueError(f"model must be one of {tuple(MIN_MATCHES)}, got {model!r}")
    count = len(points_query)
    failed = Fit(0, np.zeros(count, bool), None)
    if count < MIN_MATCHES[model]:
        return failed
    p, q = (np.ascontiguousarray(x, dtype=np.float64).reshape(-1, 2) for x in (points_query, points_candidate))
    try:
        if model == "homography":
            matrix, mask = cv2.findHomography(p, q, cv2.USAC_MAGSAC, threshold, maxIters=max_iters,
                                              confidence=confidence)
        else:
            matrix, mask = cv2.findFundamentalMat(p, q, cv2.USAC_MAGSAC, threshold, confidence, max_iters)
    except cv2.error:
        return failed
    if matrix is None or mask is None or matrix.shape != (3, 3):
        return failed
    mask = mask.ravel().astype(bool)
    return Fit(int(mask.sum()), mask, matrix)


@dataclass(frozen=True)
class GeometricSettings:
    """What is verified and how, and how geometric evidence enters the score (docs/reranking.md)."""

    top_n: int = 20               # candidates verified per query (the rest keep their places after them)
    model: str = "fundamental"    # or "homography"
    threshold: float = 3.0        # MAGSAC's largest residual, pixels
    confidence: float = 0.999
    max_iters: int = 2000
    ratio: float = 0.8            # Lowe's ratio test (1 keeps every mutual nearest neighbour)
    weight: float = 0.1           # the most geometry can add to a candidate's score (similarity units)
    half_inliers: float = 50.0    # inliers at which geometry adds half of `weight`
    min_inliers: int = 30         # trigger: the best verified candidate needs this many inliers...
    min_margin: int = 10          # ...and this many more than the previous top 1
    workers: int = 2              # threads matching and fitting candidates

    def __post_init__(self) -> None:
        if self.model not in MIN_MATCHES:
            raise ValueError(f"model must be one of {tuple(MIN_MATCHES)}, got {self.model!r}")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be in (0, 1], got {self.ratio}")
        for name in ("top_n", "max_iters", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("threshold", "half_inliers"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("weight", "min_inliers", "min_margin"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}")


def geometric_settings(params: dict) -> GeometricSettings:
    """GeometricSettings from a mapping of its fields (a YAML mapping, key=value pairs); an unknown key or a bad
    value is a ValueError naming it."""
    names = [f.name for f in fields(GeometricSettings)]
    unknown = sorted(set(params) - set(names))
    if unknown:
        raise ValueError(f"geometric verification has no parameter {unknown[0]!r} (it takes {', '.join(names)})")
    try:
        return GeometricSettings(**params)
    except TypeError as exc:   # e.g. a string where a number belongs
        raise ValueError(f"geometric verification parameters {params}: {exc}") from exc


def combined_scores(prior: np.ndarray, inliers: np.ndarray, weight: float, half_inliers: float) -> np.ndarray:
    """prior + weight * n / (n + half_inliers): the previous stage's score plus bounded geometric evidence. The
    term saturates, so a candidate's global similarity still counts against one with many more inliers."""
    inliers = np.asarray(inliers, dtype=np.float64)
    return np.asarray(prior, dtype=np.float64) + weight * inliers / (inliers + half_inliers)


def trigger_fires(inliers: np.ndarray, min_inliers: int, min_margin: int) -> bool:
    """Whether the evidence is strong (the most inliers >= min_inliers) and decisive (at least min_margin more
    than the previous top 1, inliers[0]); otherwise the previous order stands."""
    inliers = np.asarray(inliers)
    if inliers.size == 0:
        return False
    best = int(inliers.max())
    return best >= min_inliers and best - int(inliers[0]) >= min_margin


@dataclass(frozen=True)
class Verification:
    """The outcome for one query, in terms of the order it was given (index 0 = previous top 1).

    order    (K,) the new order: indices into the given candidates
    inliers  (N,) inlier counts of the first N verified candidates
    scores   (N,) their combined scores
    fired    whether the trigger let geometry reorder them
    """

    order: np.ndarray
    inliers: np.ndarray
    scores: np.ndarray
    fired: bool

    @property
    def changed_top1(self) -> bool:
        return bool(self.order[0] != 0)

    @property
    def top_inliers(self) -> int:
        """Inliers of the new top 1 (always one of the verified candidates)."""
        return int(self.inliers[self.order[0]])

    def support(self, min_inliers: int) -> float:
        """How far the new top 1's geometry confirms it, 0 to 1: its inliers over `min_inliers` (1 when 0)."""
        return min(1.0, self.top_inliers / min_inliers) if min_inliers > 0 else 1.0


def geometric_order(prior: np.ndarray, inliers: np.ndarray, settings: GeometricSettings) -> Verification:
    """Re-rank K candidates with `prior` scores (previous stage, in its order) given the first N's inliers: by
    combined score when the trigger fires, else unchanged; candidates after N keep their places."""
    prior, inliers = np.asarray(prior), np.asarray(inliers, dtype=np.int64)
    n = len(inliers)
    if n > len(prior):
        raise ValueError(f"{n} inlier counts for {len(prior)} candidates")
    scores = combined_scores(prior[:n], inliers, settings.weight, settings.half_inliers)
    fired = trigger_fires(inliers, settings.min_inliers, settings.min_margin)
    head = np.argsort(-scores, kind="stable") if fired else np.arange(n)
    return Verification(np.concatenate([head, np.arange(n, len(prior))]), inliers, scores, fired)


@cache
def _thread_pools() -> ThreadpoolController:
    """The process's native thread pools (BLAS and others), found once: scanning the loaded libraries for them
    costs about 0.7 ms, against 0.03 ms to limit them once found."""
    return ThreadpoolController()


class GeometricVerifier:
    """Matches a query's features (extracted once per frame) against candidates' features and fits the model,
    candidates in parallel threads (NumPy's matrix product and OpenCV release the GIL). NumPy's BLAS runs on one
    thread meanwhile (threadpoolctl): candidates are the parallel axis, and on 2 busy cores BLAS's own threads made
    these small products 3-7x slower (benchmarks/geometric.py)."""

    def __init__(self, settings: GeometricSettings = GeometricSettings()) -> None:
        self.settings = settings

    def verify(self, query: Features, candidate: Features) -> Fit:
        """The fit of one candidate against the query."""
        s = self.settings
        pairs = match(query, candidate, s.ratio)
        return fit(query.keypoints[pairs[:, 0]], candidate.keypoints[pairs[:, 1]], s.model, s.threshold,
                   s.confidence, s.max_iters)

    def inliers(self, query: Features, candidates: Sequence[Features]) -> np.ndarray:
        """(len(candidates),) inlier counts, in the given order."""
        def count(candidate: Features) -> int:
            return self.verify(query, candidate).inliers

        with _thread_pools().limit(limits=1, user_api="blas"):
            if self.settings.workers == 1 or len(candidates) < 2:
                return np.array([count(c) for c in candidates], dtype=np.int64)
            with ThreadPoolExecutor(min(self.settings.workers, len(candidates))) as pool:
                return np.fromiter(pool.map(count, candidates), dtype=np.int64, count=len(candidates))

    def rerank(self, query: Features, candidates: Sequence[Features], prior: np.ndarray) -> Verification:
        """Verify the first `top_n` of `candidates` (features of the previous stage's candidates, in its order;
        more than top_n may be given, fewer than len(prior)) and re-rank all len(prior) of them."""
        if len(candidates) > len(prior):
            raise ValueError(f"{len(candidates)} candidates' features for {len(prior)} prior scores")
        verified = self.inliers(query, candidates[:self.settings.top_n])
        return geometric_order(prior, verified, self.settings)
