"""The pipeline object, without ROS: camera image (+ GPS hint) -> descriptor -> retrieval -> re-ranking ->
(optionally) geometric verification -> pose estimate with a covariance derived from the agreement of the top
matches, from how distinct the chosen place is among the candidates and from its geometric support
(docs/conventions.md, "Position covariance")."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from scipy.spatial import cKDTree

from .descriptors.extract import DescriptorExtractor, pick_device
from .descriptors.model import GlobalDescriptor
from .geo import UtmZone, body_to_grid, compass_to_grid, heading_difference, utm_to_latlon
from .geometric import Features, GeometricSettings, GeometricVerifier, Verification
from .mapdb import MapBundle
from .rerank import Reranker, build_reranker, rerank_inputs, rerank_order

BACKENDS = ("torch", "onnxruntime")


@dataclass(frozen=True)
class LocalizerSettings:
    """How many candidates to re-rank, how matches become a pose, and how GPS hints restrict the search."""

    top_k: int = 100                  # candidates retrieved and re-ranked
    pose_matches: int = 5             # top re-ranked matches that form the estimate
    temperature: float = 0.05         # softmax temperature turning scores into weights
    position_floor_m: float = 0.3     # least 1-sigma of a trusted estimate; raise it to the map's position accuracy
    heading_floor_deg: float = 10.0
    agree_radius_m: float = 25.0      # matches this close to the best one count as agreeing (confidence)
    ambiguous_ratio: float = 1.25     # distinctiveness at or below which the place could be any candidate's
    distinct_ratio: float = 3.0       # distinctiveness at or above which the agreeing matches are trusted alone
    gps_radius_m: float = 50.0        # search radius around a GPS hint, plus 3 sigma of the fix
    device: str = "auto"              # torch device of the descriptor (backend torch) and the re-ranker
    fp16: bool = False                # float16 autocast for the descriptor on CUDA (backend torch)
    backend: str = "torch"            # descriptor inference: torch or onnxruntime (docs/deployment.md)
    onnx_model: str = ""              # onnxruntime: an export of the map's model; "" = export it into the cache
    onnx_providers: str = "CPUExecutionProvider"   # onnxruntime execution providers, comma-separated, or auto

    def __post_init__(self) -> None:
        if self.top_k < 1 or not 1 <= self.pose_matches <= self.top_k:
            raise ValueError(f"need top_k >= 1 and 1 <= pose_matches <= top_k, got {self.top_k}, {self.pose_matches}")
        for name in ("temperature", "position_floor_m", "heading_floor_deg", "agree_radius_m", "gps_radius_m"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.ambiguous_ratio < self.distinct_ratio:
            raise ValueError(f"need 0 < ambiguous_ratio < distinct_ratio, got {self.ambiguous_ratio}, "
                             f"{self.distinct_ratio}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")


@dataclass
class Match:
    key: str
    index: int
    score: float
    easting: float
    northing: float
    heading: float


@dataclass
class Localization:
    """One frame's result: ranked matches, pose (map's UTM zone, grid heading), uncertainty, provenance."""

    matches: list
    easting: float
    northing: float
    heading: float                    # degrees clockwise from UTM grid north
    lat: float
    lon: float
    position_covariance: np.ndarray   # (2, 2) m^2, east/north
    heading_variance: float           # deg^2
    confidence: float                 # share of the pose weight that agrees with the best match
    gps_used: bool
    gps_fallback: bool                # a hint was given but nothing lay within the radius
    gps_note: str
    stamp: float | None
    timings: dict = field(default_factory=dict)   # seconds per stage
    distinctiveness: float = math.nan  # how much more similar the chosen place is than the best one elsewhere
    verification: Verification | None = None   # geometric verification's outcome (None: not run)

    def of_vehicle(self, forward_m: float, left_m: float, camera_yaw_deg: float, zone: UtmZone) -> "Localization":
        """This camera pose as the pose of the vehicle that carries the camera at (`forward_m`, `left_m`) in its body
        frame (REP-103: x forward, y left), its optical axis at `camera_yaw_deg` counter-clockwise from x; lat/lon
        follow in the map's `zone`. The covariance is the camera's (the offset is rigid)."""
        heading = (self.heading + camera_yaw_deg) % 360.0           # the vehicle's grid heading
        if forward_m == left_m == 0:
            return replace(self, heading=heading)                      # same place: no projection per frame
        east, north = np.array([self.easting, self.northing]) - body_to_grid(heading) @ [forward_m, left_m]
        lat, lon = utm_to_latlon(east, north, zone)
        return replace(self, easting=east, northing=north, heading=heading, lat=float(lat), lon=float(lon))


def check_candidates(reranker: Reranker, top_k: int, map_size: int) -> None:
    """Refuse a learned re-ranker that needs more candidates than `top_k` retrieves from a map of `map_size` images:
    it could never run."""
    needed = getattr(getattr(reranker, "config", None), "K", None)
    if needed is not None and needed > min(top_k, map_size):
        raise ValueError(f"the {reranker.name} model re-ranks K = {needed} candidates, but top_k is {top_k} "
                         f"(and the map has {map_size} images): raise top_k first")


def hint_from_fix(fix, default_sigma_m: float = 10.0) -> tuple[float, float, float] | None:
    """(lat, lon, 1-sigma metres) of a sensor_msgs/NavSatFix usable as a GPS hint, or None when it has no fix
    (status < STATUS_FIX) or a position that is not finite or outside ±90° / ±180°. Works on rclpy and rosbags
    messages alike."""
    lat, lon = fix.latitude, fix.longitude
    if fix.status.status < 0 or not (math.isfinite(lat) and math.isfinite(lon)) or abs(lat) > 90 or abs(lon) > 180:
        return None
    variance = float(fix.position_covariance[0]) if fix.position_covariance_type else float("nan")
    sigma = math.sqrt(variance) if math.isfinite(variance) and variance > 0 else default_sigma_m
    return float(lat), float(lon), sigma


class Localizer:
    """Localises camera frames against a map with its descriptor model and a re-ranker."""

    def __init__(self, bundle: MapBundle, model: GlobalDescriptor, reranker: Reranker | str = "none",
                 settings: LocalizerSettings = LocalizerSettings(), reranker_params: dict | None = None,
                 geometric: GeometricSettings | None = None) -> None:
        bundle.check_model(model)
        self.bundle, self.settings = bundle, settings
        self._centre = (float(np.mean(bundle.table.lat)), float(np.mean(bundle.table.lon)))
        self.spacing_m = map_spacing(bundle.xy_tree)
        self.device = pick_device(settings.device)
        if settings.backend == "onnxruntime":
            from .onnx_export import OnnxDescriptorExtractor

            self.extractor = OnnxDescriptorExtractor(model, settings.onnx_model, settings.onnx_providers, batch_size=1)
        else:
            self.extractor = DescriptorExtractor(model, self.device, batch_size=1, fp16=settings.fp16)
        self.set_reranker(reranker, **(reranker_params or {}))
        self.set_geometric(geometric)

    def set_geometric(self, settings: GeometricSettings | None) -> None:
        """Verify the re-ranked candidates geometrically with `settings` (None: do not). Refused (MapError) for a
        map whose local features this package cannot extract for a query: none, or imported from hloc."""
        self.local_extractor = None if settings is None else self.bundle.local_extractor()
        self.verifier = None if settings is None else GeometricVerifier(settings)

    def prepare_reranker(self, reranker: Reranker | str, **params) -> Reranker:
        """A re-ranker checked against this map, on this localizer's device, with what it precomputes of the map
        (slow for learned models): safe to run beside `localize`, then swap in with `use_reranker`."""
        reranker = build_reranker(reranker, **params) if isinstance(reranker, str) else reranker
        self.bundle.check_reranker(reranker)
        check_candidates(reranker, self.settings.top_k, len(self.bundle))
        reranker = reranker.to(self.device).eval()
        reranker.attach_map(self.bundle.descriptors)
        return reranker

    def use_reranker(self, reranker: Reranker) -> None:
        """Swap in a re-ranker made by `prepare_reranker` (between two frames)."""
        self.reranker = reranker

    def set_reranker(self, reranker: Reranker | str, **params) -> None:
        """Prepare and swap the re-ranker in one call."""
        self.use_reranker(self.prepare_reranker(reranker, **params))

    def localize(self, image: np.ndarray, gps_hint: tuple[float, float, float] | None = None,
                 heading_hint: float | None = None, stamp: float | None = None) -> Localization:
        """Localise one RGB image. `gps_hint` = (lat, lon, 1-sigma metres); `heading_hint` = compass degrees
        (clockwise from true north), given to re-rankers that use the query's heading."""
        timings = {}
        start = time.perf_counter()
        descriptor = self.extractor.describe_arrays([image])
        timings["descriptor"] = time.perf_counter() - start

        start = time.perf_counter()
        hint_xy, sigma, note = self._hint(gps_hint)
        radius = None if hint_xy is None else self.settings.gps_radius_m + 3 * sigma
        k = min(self.settings.top_k, len(self.bundle))
        result = self.bundle.search(descriptor, k, hint_xy=hint_xy, radius=radius)
        if result.fallback[0]:
            note = f"no map image within {radius:.0f} m of the GPS hint: searched the whole map"
        timings["retrieval"] = time.perf_counter() - start

        start = time.perf_counter()
        ids = result.ids[0][result.ids[0] >= 0]
        if ids.size == 0:
            raise ValueError("the map returned no candidates")
        order, similarities = self._rerank(descriptor, ids, self._grid_heading(heading_hint, gps_hint))
        timings["reranking"] = time.perf_counter() - start

        verification, support = None, 1.0
        if self.verifier is not None:
            order, verification = self._verify(image, ids[order], similarities[order], order, timings)
            support = verification.support(self.verifier.settings.min_inliers)

        start = time.perf_counter()
        fix = (hint_xy[0], sigma) if result.restricted[0] else None
        localization = self._pose(ids[order], similarities[order], fix, gps_used=bool(result.restricted[0]),
                                  fallback=bool(result.fallback[0]), note=note, stamp=stamp, support=support)
        timings["pose"] = time.perf_counter() - start
        localization.timings, localization.verification = timings, verification
        return localization

    def _verify(self, image: np.ndarray, ranked: np.ndarray, prior: np.ndarray, order: np.ndarray,
                timings: dict) -> tuple[np.ndarray, Verification]:
        """Geometric verification of the `ranked` map ids (the re-ranker's `order` of the candidates) with their
        descriptor similarities as the `prior`: the new order and the verification. The query's local features
        are extracted once, with the map's extractor."""
        start = time.perf_counter()
        query = Features.of(self.local_extractor(image))
        timings["local_features"] = time.perf_counter() - start
        start = time.perf_counter()
        candidates = self.bundle.matching_features(ranked[:self.verifier.settings.top_n])
        verification = self.verifier.rerank(query, candidates, prior)
        timings["verification"] = time.perf_counter() - start
        return order[verification.order], verification

    def _hint(self, gps_hint) -> tuple[np.ndarray | None, float, str]:
        """The hint's (1, 2) position in the map's zone (None: no usable hint), its 1-sigma (0: unknown), and a
        note saying which."""
        if gps_hint is None:
            return None, 0.0, "no GPS hint"
        lat, lon, sigma = (float(v) for v in gps_hint)
        if not (math.isfinite(lat) and math.isfinite(lon)) or abs(lat) > 90 or abs(lon) > 180:
            return None, 0.0, f"invalid GPS hint ({lat}, {lon}) ignored"
        sigma = sigma if math.isfinite(sigma) and sigma > 0 else 0.0
        return self.bundle.hint_from_latlon(lat, lon), sigma, "GPS hint used"

    def _grid_heading(self, heading_hint: float | None, gps_hint) -> float:
        """A compass heading hint as a grid heading in the map's zone (at the GPS hint, else the map's centre);
        NaN when there is none."""
        if heading_hint is None or not math.isfinite(float(heading_hint)):
            return float("nan")
        lat, lon = (gps_hint[0], gps_hint[1]) if gps_hint is not None else self._centre
        if not (math.isfinite(lat) and math.isfinite(lon)) or abs(lat) > 90 or abs(lon) > 180:
            lat, lon = self._centre
        return float(compass_to_grid(float(heading_hint), lat, lon, self.bundle.table.zone))

    def _rerank(self, descriptor: np.ndarray, ids: np.ndarray, grid_heading: float) -> tuple[np.ndarray, np.ndarray]:
        """New order of the candidates and their descriptor similarities to the query (in retrieval order); map
        geometry is looked up only for re-rankers that use it."""
        with torch.inference_mode():
            inputs = rerank_inputs(self.bundle, descriptor, ids[None], np.array([grid_heading]),
                                   geometry=self.reranker.uses_geometry, device=self.device)
            order = rerank_order(self.reranker(inputs))[0]
            similarities = torch.mv(inputs.candidates[0].float(), inputs.query[0].float())
            return order.cpu().numpy(), similarities.cpu().numpy()

    def _pose(self, ids, similarities, fix, gps_used, fallback, note, stamp, support: float = 1.0) -> Localization:
        """The estimate is the weighted mean of the top matches that agree with the best one (weights: softmax of
        descriptor similarities). Its covariance is the uncertainty of that mean while the place is distinct: the
        camera lies somewhere between map images (spacing^2 / 12, a uniform error, over the agreeing matches'
        effective number), plus a floor. As the place gets ambiguous (`distinctiveness`), the spread of the
        candidates around the estimate is added: the truth could be at any of them, weighted by their agreement
        with the GPS `fix` ((x, y), 1-sigma) when the search used one. `support` (0 to 1, geometric verification's
        confirmation of the best match) scales the trust in a distinct place and the confidence: few inliers,
        larger covariance. Calibration: docs/conventions.md."""
        table, s = self.bundle.table, self.settings
        matches = [Match(str(table.keys[i]), int(i), float(sim), float(table.easting[i]), float(table.northing[i]),
                         float(table.heading[i])) for i, sim in zip(ids, similarities)]
        top = ids[:s.pose_matches]
        logits = similarities[:s.pose_matches].astype(np.float64) / s.temperature
        weights = np.exp(logits - logits.max())
        weights /= weights.sum()
        positions = np.stack([table.easting[ids], table.northing[ids]], axis=1)
        xy = positions[:s.pose_matches]
        agree = (np.hypot(*(xy - xy[0]).T) <= s.agree_radius_m) & \
            (heading_difference(table.heading[top], table.heading[top[0]]) <= 90.0)
        cluster = weights * agree / (weights * agree).sum()
        mean = cluster @ xy
        local = (s.position_floor_m ** 2 + self.spacing_m ** 2 / 12 * (cluster ** 2).sum()) * np.eye(2)
        candidates = positions - mean
        ratio = distinctiveness(similarities, float(similarities[:s.pose_matches][agree].max()),
                                np.hypot(*candidates.T) > s.agree_radius_m)
        distinct = float(np.clip((ratio - s.ambiguous_ratio) / (s.distinct_ratio - s.ambiguous_ratio), 0.0, 1.0))
        trust = support * distinct
        where = _place_weights(positions, fix)
        covariance = local + (1.0 - trust) * (where[:, None] * candidates).T @ candidates
        angles = np.radians(table.heading[top])
        unit = np.stack([np.sin(angles), np.cos(angles)], axis=1)
        direction = cluster @ unit
        heading = float(np.degrees(np.arctan2(direction[0], direction[1])) % 360.0)
        resultant = float(np.clip(np.linalg.norm(weights @ unit), 1e-9, 1.0))
        heading_variance = math.degrees(math.sqrt(-2.0 * math.log(resultant))) ** 2 + s.heading_floor_deg ** 2
        lat, lon = utm_to_latlon(mean[0], mean[1], table.zone)
        return Localization(matches=matches, easting=float(mean[0]), northing=float(mean[1]), heading=heading,
                            lat=float(lat), lon=float(lon), position_covariance=covariance,
                            heading_variance=heading_variance, confidence=support * float(weights[agree].sum()),
                            gps_used=gps_used, gps_fallback=fallback, gps_note=note, stamp=stamp,
                            distinctiveness=ratio)


def map_spacing(tree: cKDTree, sample: int = 10_000) -> float:
    """The median distance (m) from a map image to its nearest neighbour (`tree`: the map's positions), over at
    most `sample` images (a fixed choice): how far apart the places are that a camera is matched to."""
    if tree.n < 2:
        return 0.0
    picked = tree.data[np.linspace(0, tree.n - 1, min(sample, tree.n)).astype(np.int64)]
    return float(np.median(tree.query(picked, k=2)[0][:, 1]))


def _place_weights(xy: np.ndarray, fix: tuple[np.ndarray, float] | None) -> np.ndarray:
    """How likely the truth is at each candidate position when the place is ambiguous: alike, or by the GPS fix's
    Gaussian likelihood when there is a fix with a known sigma."""
    if fix is None or not fix[1] > 0:
        return np.full(len(xy), 1.0 / len(xy))
    logits = -((xy - fix[0]) ** 2).sum(axis=1) / (2 * fix[1] ** 2)
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def distinctiveness(similarities: np.ndarray, best: float, elsewhere: np.ndarray) -> float:
    """How much more the chosen place stands out from the candidates' median similarity than the best candidate
    `elsewhere` (a boolean mask) does: a ratio test between places, free of the descriptor's similarity scale.
    Infinite when nothing elsewhere beats the median; 1 (ambiguous) when the chosen place does not either."""
    median = float(np.median(similarities))
    rival = float(similarities[elsewhere].max()) if elsewhere.any() else -math.inf
    if rival <= median:
        return math.inf if best > median else 1.0
    return max(best - median, 0.0) / (rival - median)
