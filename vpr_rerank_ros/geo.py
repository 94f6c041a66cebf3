"""Geodesy and field-of-view geometry.

WGS84 <-> UTM and <-> a local ENU frame (pyproj), compass heading <-> REP-103 yaw, the field-of-view
sector of a geotagged image and the positional affinity between two images (docs/reranking.md): the area
of the intersection of their sectors divided by the area of one sector.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyproj
import scipy.sparse
import shapely
import torch
from scipy.spatial import cKDTree

FOV_RADIUS_M = 50.0
FOV_ANGLE_DEG = 90.0


# --------------------------------------------------------------------------- UTM and ENU


@dataclass(frozen=True)
class UtmZone:
    """A UTM zone: number 1..60 and hemisphere."""

    number: int
    south: bool = False

    def __post_init__(self) -> None:
        if not 1 <= int(self.number) <= 60:
            raise ValueError(f"UTM zone number must be in 1..60, got {self.number}")

    @property
    def epsg(self) -> int:
        """EPSG code of the WGS84 / UTM zone CRS (326xx north, 327xx south)."""
        return (32700 if self.south else 32600) + int(self.number)

    def __str__(self) -> str:
        return f"{self.number}{'S' if self.south else 'N'}"

    @classmethod
    def parse(cls, text: str) -> "UtmZone":
        """Parse '33N' / '33S' (the form `str()` writes)."""
        text = str(text).strip().upper()
        if len(text) < 2 or text[-1] not in "NS" or not text[:-1].isdigit():
            raise ValueError(f"not a UTM zone like '33N' or '19S': {text!r}")
        return cls(int(text[:-1]), text[-1] == "S")


def utm_zone_for(lat: float, lon: float) -> UtmZone:
    """The standard UTM zone of a WGS84 point, with the Norway (32V) and Svalbard exceptions."""
    if not (np.isfinite(lat) and np.isfinite(lon)) or abs(lat) > 90:
        raise ValueError(f"invalid latitude/longitude: {lat}, {lon}")
    lon = float(lon)
    if not -180.0 <= lon <= 180.0:
        lon = (lon + 180.0) % 360.0 - 180.0
    number = min(int((lon + 180.0) // 6.0) + 1, 60)
    if 56.0 <= lat < 64.0 and 3.0 <= lon < 12.0:
        number = 32
    elif 72.0 <= lat < 84.0 and 0.0 <= lon < 42.0:
        number = 31 if lon < 9.0 else 33 if lon < 21.0 else 35 if lon < 33.0 else 37
    return UtmZone(number, lat < 0)


@lru_cache(maxsize=64)
def _utm_transformer(epsg: int) -> pyproj.Transformer:
    return pyproj.Transformer.from_crs(4326, epsg, always_xy=True)


def _finite_latlon(lat, lon) -> tuple[np.ndarray, np.ndarray]:
    lat, lon = np.broadcast_arrays(np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64))
    if not (np.all(np.isfinite(lat)) and np.all(np.isfinite(lon))):
        raise ValueError("latitude/longitude contain NaN or inf")
    if np.any(np.abs(lat) > 90.0):
        raise ValueError("latitude outside [-90, 90]")
    return lat, lon


def as_zone(zone: UtmZone | str) -> UtmZone:
    """A UtmZone, or one parsed from its text (e.g. "33N", "56S")."""
    return zone if isinstance(zone, UtmZone) else UtmZone.parse(zone)


def latlon_to_utm(lat, lon, zone: UtmZone | str | None = None) -> tuple[np.ndarray, np.ndarray, UtmZone]:
    """Project WGS84 points into one UTM zone (a UtmZone or its text, e.g. "33N"); returns (easting, northing,
    zone).

    Without `zone`, the zone of the points' mean position is used for all of them, so that a set of
    points straddling a zone border stays in one metric frame (UTM stays accurate a few degrees past
    its zone's edges).
    """
    lat, lon = _finite_latlon(lat, lon)
    zone = None if zone is None else as_zone(zone)
    if zone is None:
        if lat.size == 0:
            raise ValueError("cannot choose a UTM zone for an empty set of points")
        mean_lon = math.degrees(math.atan2(np.sin(np.radians(lon)).mean(), np.cos(np.radians(lon)).mean()))
        zone = utm_zone_for(float(lat.mean()), mean_lon)
    easting, northing = _utm_transformer(zone.epsg).transform(lon, lat)
    return np.asarray(easting, dtype=np.float64), np.asarray(northing, dtype=np.float64), zone


def utm_to_latlon(easting, northing, zone: UtmZone | str) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `latlon_to_utm` for a known zone (a UtmZone or its text); returns (lat, lon) in degrees."""
    zone = as_zone(zone)
    easting, northing = np.broadcast_arrays(np.asarray(easting, np.float64), np.asarray(northing, np.float64))
    if not (np.all(np.isfinite(easting)) and np.all(np.isfinite(northing))):
        raise ValueError("easting/northing contain NaN or inf")
    lon, lat = _utm_transformer(zone.epsg).transform(easting, northing, direction="INVERSE")
    return np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64)


def meridian_convergence_deg(lat, lon, zone: UtmZone) -> np.ndarray:
    """Angle from true north to UTM grid north at a point, degrees (positive east of the central meridian).

    A compass heading h (true north) is h - convergence in the UTM grid; up to ~3 degrees at zone edges.
    """
    lat, lon = _finite_latlon(lat, lon)
    factors = pyproj.Proj(f"EPSG:{zone.epsg}").get_factors(lon, lat)
    return np.asarray(factors.meridian_convergence, dtype=np.float64)


def compass_to_grid(heading_deg, lat, lon, zone: UtmZone) -> np.ndarray:
    """Compass headings (degrees clockwise from true north) at WGS84 points -> UTM grid headings in [0, 360)
    (clockwise from grid north), the form map poses use; NaN headings stay NaN (unknown)."""
    return np.mod(np.asarray(heading_deg, dtype=np.float64) - meridian_convergence_deg(lat, lon, zone), 360.0)


class EnuFrame:
    """A local east-north-up frame (metres) tangent to the WGS84 ellipsoid at a datum."""

    def __init__(self, lat0: float, lon0: float, alt0: float = 0.0) -> None:
        _finite_latlon(lat0, lon0)
        self.lat0, self.lon0, self.alt0 = float(lat0), float(lon0), float(alt0)
        self._transformer = pyproj.Transformer.from_pipeline(
            "+proj=pipeline +step +proj=axisswap +order=2,1 +step +proj=unitconvert +xy_in=deg +xy_out=rad "
            "+step +proj=cart +ellps=WGS84 "
            f"+step +proj=topocentric +ellps=WGS84 +lat_0={self.lat0} +lon_0={self.lon0} +h_0={self.alt0}"
        )

    def to_enu(self, lat, lon, alt=0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """WGS84 (degrees, metres above the ellipsoid) -> (east, north, up) metres."""
        lat, lon = _finite_latlon(lat, lon)
        alt = np.broadcast_to(np.asarray(alt, dtype=np.float64), lat.shape)
        e, n, u = self._transformer.transform(lat, lon, alt)
        return np.asarray(e), np.asarray(n), np.asarray(u)

    def to_latlon(self, east, north, up=0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(east, north, up) metres -> WGS84 (lat, lon degrees, alt metres)."""
        east, north, up = np.broadcast_arrays(*(np.asarray(v, dtype=np.float64) for v in (east, north, up)))
        lat, lon, alt = self._transformer.transform(east, north, up, direction="INVERSE")
        return np.asarray(lat), np.asarray(lon), np.asarray(alt)


def heading_to_yaw(heading_deg):
    """Compass heading (degrees clockwise from north) -> REP-103 yaw (radians counter-clockwise from east) in (-pi, pi]."""
    yaw = np.radians(90.0 - np.asarray(heading_deg, dtype=np.float64))
    return -((-yaw + np.pi) % (2 * np.pi) - np.pi)


def body_to_grid(heading_deg: float) -> np.ndarray:
    """The 2x2 rotation taking a vector in a vehicle's body frame (REP-103: x forward, y left) into the map's grid
    (x east, y north), for the vehicle's grid heading in compass degrees."""
    yaw = float(heading_to_yaw(heading_deg))
    c, s = math.cos(yaw), math.sin(yaw)
    return np.array([[c, -s], [s, c]])


def quaternion_yaw(x: float, y: float, z: float, w: float) -> float:
    """Yaw (radians, about z, REP-103) of an orientation quaternion; a ValueError when it is not finite or
    has no length (ROS's "no orientation" is all zeros)."""
    q = np.array([x, y, z, w], dtype=np.float64)
    norm = float(np.linalg.norm(q))
    if not np.isfinite(q).all() or norm < 1e-6:
        raise ValueError(f"orientation quaternion ({x}, {y}, {z}, {w}) is not a rotation")
    x, y, z, w = q / norm
    return float(np.arctan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z)))


def yaw_to_heading(yaw_rad):
    """REP-103 yaw (radians counter-clockwise from east) -> compass heading in [0, 360) degrees."""
    return (90.0 - np.degrees(np.asarray(yaw_rad, dtype=np.float64))) % 360.0


def heading_difference(a_deg, b_deg):
    """Absolute angular difference of two headings, degrees in [0, 180]."""
    d = (np.asarray(a_deg, dtype=np.float64) - np.asarray(b_deg, dtype=np.float64)) % 360.0
    return np.minimum(d, 360.0 - d)


# --------------------------------------------------------------------------- field-of-view overlap


def _check_fov(radius: float, fov_deg: float) -> None:
    if not (np.isfinite(radius) and radius > 0):
        raise ValueError(f"FoV radius must be a positive number of metres, got {radius}")
    if not 0 < fov_deg <= 180:
        raise ValueError(f"FoV angle must be in (0, 180] degrees (a sector must be convex), got {fov_deg}")


def fov_sector(easting: float, northing: float, heading_deg: float, radius: float = FOV_RADIUS_M,
               fov_deg: float = FOV_ANGLE_DEG, arc_segments: int = 512) -> shapely.Polygon:
    """The field-of-view sector of one image as a polygon (its arc drawn with `arc_segments` segments)."""
    _check_fov(radius, fov_deg)
    return shapely.Polygon(_sector_rings(np.array([[easting, northing, heading_deg]], np.float64),
                                         radius, fov_deg, arc_segments)[0])


def _sector_rings(poses: np.ndarray, radius: float, fov_deg: float, arc_segments: int) -> np.ndarray:
    """(N, 3) poses -> (N, arc_segments + 3, 2) closed rings: apex, arc points counter-clockwise, apex."""
    axis = np.radians(90.0 - poses[:, 2])
    half = math.radians(fov_deg) / 2
    angles = axis[:, None] + np.linspace(-half, half, arc_segments + 1)[None, :]
    arc = poses[:, None, :2] + radius * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    apex = poses[:, None, :2]
    return np.concatenate([apex, arc, apex], axis=1)


def _as_poses(x) -> np.ndarray | torch.Tensor:
    return x if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def fov_overlap(a, b, radius: float = FOV_RADIUS_M, fov_deg: float = FOV_ANGLE_DEG, exact: bool = False):
    """Positional affinity: area(sector(a) ∩ sector(b)) / area(one sector), in [0, 1] and symmetric.

    `a`, `b`: (..., 3) array-likes or torch tensors of (easting m, northing m, heading deg) that broadcast;
    the result has the broadcast shape: a tensor on the inputs' device when one of them is a tensor (float32
    when both are float32 tensors, float64 otherwise), a float64 NumPy array otherwise.
    The default computes the area in closed form (`_sector_overlap`: vectorized torch, CPU or CUDA).
    `exact=True` intersects shapely polygons whose arcs have 512 segments instead (CPU, slow): the
    independent reference of the tests and benchmarks.
    """
    _check_fov(radius, fov_deg)
    a, b = _as_poses(a), _as_poses(b)
    if a.shape[-1:] != (3,) or b.shape[-1:] != (3,):
        raise ValueError(f"poses must have a last dimension of 3 (easting, northing, heading), "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")
    if exact:
        a = a.detach().cpu().double().numpy() if isinstance(a, torch.Tensor) else a
        b = b.detach().cpu().double().numpy() if isinstance(b, torch.Tensor) else b
        return _fov_overlap_shapely(a, b, radius, fov_deg)
    tensors = [x for x in (a, b) if isinstance(x, torch.Tensor)]
    if not tensors:
        return _sector_overlap(torch.from_numpy(a), torch.from_numpy(b), radius, fov_deg).numpy()
    if len({t.device for t in tensors}) > 1:
        raise ValueError(f"poses are on different devices: {a.device} and {b.device}")
    device = tensors[0].device
    out = _sector_overlap(torch.as_tensor(a, dtype=torch.float64, device=device),
                          torch.as_tensor(b, dtype=torch.float64, device=device), radius, fov_deg)
    low = len(tensors) == 2 and all(t.dtype in (torch.float32, torch.float16, torch.bfloat16) for t in tensors)
    return out.float() if low else out


def _fov_overlap_shapely(a: np.ndarray, b: np.ndarray, radius: float, fov_deg: float,
                         arc_segments: int = 512) -> np.ndarray:
    """The overlap of shapely polygons whose arcs have `arc_segments` segments (the reference)."""
    a, b = np.broadcast_arrays(a, b)
    shape = a.shape[:-1]
    a, b = a.reshape(-1, 3), b.reshape(-1, 3)
    _check_finite_poses(a, b)
    pa = shapely.polygons(_sector_rings(a, radius, fov_deg, arc_segments))
    pb = shapely.polygons(_sector_rings(b, radius, fov_deg, arc_segments))
    ratio = shapely.area(shapely.intersection(pa, pb)) / shapely.area(pa)
    return np.clip(ratio, 0.0, 1.0).reshape(shape)


def _check_finite_poses(*poses) -> None:
    for p in poses:
        finite = torch.isfinite(p).all() if isinstance(p, torch.Tensor) else np.isfinite(p).all()
        if not bool(finite):
            raise ValueError("poses contain NaN or inf")


# Pairs per chunk: bounds the temporaries. On the 2-core CPU, per-op overhead dominates small chunks; 65536 was the
# fastest of 2^13..2^18 for benchmarks/geometry.py's 320 x 128 matrix. CUDA takes larger chunks.
_PAIRS_PER_CHUNK = {"cpu": 1 << 16, "cuda": 1 << 22}


def _sector_overlap(a: torch.Tensor, b: torch.Tensor, radius: float, fov_deg: float) -> torch.Tensor:
    """`fov_overlap` of broadcasting (..., 3) float64 tensors: `_pair_overlap` on the pairs whose apexes are
    closer than 2r (the others are 0), a chunk of pairs at a time."""
    _check_finite_poses(a, b)
    shape = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1])
    # B's apex and axis in A's frame (apex at the origin, axis along x, lengths in units of r): coordinates are
    # subtracted in float64 (UTM needs it), and each pose's axis direction is computed once, not once per pair.
    ca, sa = _axis_direction(a)
    cb, sb = _axis_direction(b)
    dx, dy = (b[..., 0] - a[..., 0]) / radius, (b[..., 1] - a[..., 1]) / radius
    rel = torch.stack(torch.broadcast_tensors(ca * dx + sa * dy, ca * dy - sa * dx, ca * cb + sa * sb,
                                              ca * sb - sa * cb)).reshape(4, -1)
    near = torch.nonzero(rel[0] * rel[0] + rel[1] * rel[1] < 4.0).squeeze(1)
    rel = rel[:, near]
    half = math.radians(fov_deg) / 2
    step = _PAIRS_PER_CHUNK.get(a.device.type, _PAIRS_PER_CHUNK["cuda"])
    out = torch.zeros(shape.numel(), dtype=torch.float64, device=a.device)
    for start in range(0, len(near), step):
        out[near[start:start + step]] = _pair_overlap(*rel[:, start:start + step], half)
    return out.reshape(shape)


def _axis_direction(poses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the ENU angle of (..., 3) poses' axes (90° − heading)."""
    heading = torch.deg2rad(poses[..., 2])
    return torch.sin(heading), torch.cos(heading)


def _wrap(angle: torch.Tensor) -> torch.Tensor:
    """Angles in radians wrapped into [−π, π]."""
    return angle - (2 * math.pi) * torch.round(angle * (0.5 / math.pi))


def _pair_overlap(p: torch.Tensor, q: torch.Tensor, cd: torch.Tensor, sd: torch.Tensor, half: float) -> torch.Tensor:
    """Exact area(A ∩ B) / area(A) for (n,) pairs of sectors of radius 1 and half-angle `half` ≤ π/2, in A's
    frame (apex at the origin, axis along x): B's apex at (p, q), its axis at the angle of cos `cd`, sin `sd`.

    Green's theorem: the area is ½∮(x dy − y dx) along the boundary of A ∩ B, which is the part of A's boundary
    inside B and the part of B's boundary inside A. With the origin at A's apex, A's straight edges add nothing,
    a piece of A's arc adds ½·(its angle), a piece of B's arc ½·(its angle + cross(B's apex, its chord)) and a
    piece t ∈ [t0, t1] of one of B's edges (p, q) + t·e adds ½·(t1 − t0)·cross((p, q), e).
    """
    ch, sh = math.cos(half), math.sin(half)
    delta = torch.atan2(sd, cd)
    # B's right and left edge directions (angles delta ∓ half) and cross((p, q), e) of each.
    ex = torch.stack([cd * ch + sd * sh, cd * ch - sd * sh])
    ey = torch.stack([sd * ch - cd * sh, sd * ch + cd * sh])
    cross = p * ey - q * ex
    inner_a = torch.stack([sh * p + ch * q, sh * p - ch * q])     # ≥ 0: B's apex inside A's right, left edge line
    dist2 = p * p + q * q
    dist = torch.sqrt(dist2)
    towards_b = torch.atan2(q, p)
    # Row 0: A's arc (angles about A's axis) inside B; row 1: B's arc (about B's axis) inside A. Each arc is inside
    # the other circle within acos(dist/2) of the direction to the other apex: when the apexes coincide, so do the
    # circles, and the two arcs split them into complementary halves, so the common arc still counts once. Each edge
    # line of the other sector keeps the angles φ with cos(φ − centre) ≥ v (centre: the line's inward normal).
    lens = torch.acos((0.5 * dist).clamp(max=1.0))
    towards_a = _wrap(towards_b + math.pi - delta)
    offsets = p.new_tensor([math.pi / 2 - half, half - math.pi / 2])[:, None]
    starts, ends = _arc_inside(half, torch.stack([towards_b, towards_a]), lens,
                               torch.stack([delta + offsets, offsets - delta]),
                               torch.stack([torch.stack([-cross[0], cross[1]]), -inner_a]))
    signs = p.new_tensor([0.5, -0.5, -0.5, 0.5])
    angles = ends - starts
    # cross(B's apex, chord) of a piece of B's arc, in B's frame: B's apex is at dist·u(towards_a + π), the chord
    # 2·sin(angle/2)·u(middle + π/2), so the product is −2·dist·sin(angle/2)·cos(middle − towards_a).
    chords = torch.sin(0.5 * angles[:, 1]) * torch.cos(0.5 * (ends[:, 1] + starts[:, 1]) - towards_a)
    edges = _edge_inside(p, q, ex, ey, cd, sd, inner_a, dist2, half) * cross
    area = signs @ (angles.sum(1) - 2.0 * dist * chords) + 0.5 * (edges[0] - edges[1])
    return (area / half).clamp(0.0, 1.0)


def _arc_inside(half: float, disc_centre: torch.Tensor, disc_width: torch.Tensor, line_centre: torch.Tensor,
                line_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The part of (2, n) arcs (angles φ ∈ [−half, half] about their axis) inside the other sector: the angles
    within `disc_width` of `disc_centre` with cos(φ − centre) ≥ v for both (2 arcs, 2 lines, n) `line_centre`,
    `line_v`. Returns (4, 2, n) starts and ends (end ≥ start) of intervals I, I∩E1, I∩E2, I∩E1∩E2 whose signed
    sum (+, −, −, +) is that part: I what the disc and lines allow, E1 and E2 what each line forbids besides."""
    width = torch.acos(line_v.clamp(-1.0, 1.0))
    # v ≥ 0 allows centre ± acos(v) (at most π/2 each side), v < 0 forbids the opposite ± (π − acos(v)); an arc
    # of at most π meets either one as a single interval once its centre is wrapped into [−π, π]. (v = ±0 may go
    # either way: both describe the same half circle.)
    forbids = 5.0 - torch.copysign(line_v.new_tensor(5.0), line_v)        # 10 if v < 0, else 0
    centre = _wrap(line_centre)
    start = torch.maximum((disc_centre - disc_width).clamp(min=-half), (centre - width - forbids).amax(1))
    end = torch.minimum((disc_centre + disc_width).clamp(max=half), (centre + width + forbids).amin(1))
    opposite = centre - torch.copysign(centre.new_tensor(math.pi), centre)
    gap = (math.pi - 10.0) - width + forbids
    (lo1, lo2), (hi1, hi2) = (opposite - gap).unbind(1), (opposite + gap).unbind(1)
    start1, end1 = torch.maximum(start, lo1), torch.minimum(end, hi1)
    starts = torch.stack([start, start1, torch.maximum(start, lo2), torch.maximum(start1, lo2)])
    ends = torch.stack([end, end1, torch.minimum(end, hi2), torch.minimum(end1, hi2)])
    return starts, torch.maximum(ends, starts)


def _edge_inside(p: torch.Tensor, q: torch.Tensor, ex: torch.Tensor, ey: torch.Tensor, cd: torch.Tensor,
                 sd: torch.Tensor, inner: torch.Tensor, dist2: torch.Tensor, half: float) -> torch.Tensor:
    """Lengths t1 − t0 of the parts of B's (2, n) edges (p, q) + t·(ex, ey), t ∈ [0, 1], inside sector A (apex at
    the origin, axis along x); (cd, sd): B's axis direction, `inner`: (2, n) of `_pair_overlap`, dist2: p² + q²."""
    pe = p * ex + q * ey
    root = torch.sqrt((pe * pe - dist2 + 1.0).clamp(min=0.0))                 # |(p, q) + t·e| ≤ 1
    t0, t1 = (-pe - root).clamp(min=0.0), (root - pe).clamp(max=1.0)
    # Inner side of A's edge line k: inner[k] + t·g[k] ≥ 0, with g the sine of the angle from A's edge line to B's
    # edge, so t ≥ −inner/g if g > 0 and t ≤ −inner/g if g < 0. A parallel edge (g = ±0) gets ±inf: all or
    # nothing; the 0/0 of an edge along A's edge line may become anything finite: that edge adds nothing.
    c2, s2 = math.cos(2 * half), math.sin(2 * half)
    g = torch.stack([torch.stack([sd, sd * c2 + cd * s2]), torch.stack([cd * s2 - sd * c2, -sd])])
    bound = torch.nan_to_num(-inner[:, None] / g, nan=0.0)
    side = torch.copysign(p.new_tensor(3.0), g)
    t0 = torch.maximum(t0, torch.minimum(bound, side).amax(0))
    t1 = torch.minimum(t1, torch.maximum(bound, side).amin(0))
    return (t1 - t0).clamp(min=0.0)


# --------------------------------------------------------------------------- map-wide overlap graph


class OverlapGraph:
    """Sparse symmetric FoV-overlap matrix of a map: entry (i, j) > 0 only for overlapping sectors.

    Built once per map with KD-trees (only pairs closer than 2r are computed), a chunk of rows at a time; a
    frame's K×L positional affinities among map images are then a sparse lookup, never new geometry.
    """

    def __init__(self, matrix: scipy.sparse.csr_matrix, radius: float, fov_deg: float) -> None:
        if matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"overlap matrix must be square, got {matrix.shape}")
        self.matrix = matrix.tocsr()
        self.radius, self.fov_deg = float(radius), float(fov_deg)

    @property
    def size(self) -> int:
        return self.matrix.shape[0]

    @classmethod
    def build(cls, poses, radius: float = FOV_RADIUS_M, fov_deg: float = FOV_ANGLE_DEG,
              chunk_rows: int = 4096) -> "OverlapGraph":
        """Overlaps of all pairs of (N, 3) poses with overlap > 0; the diagonal is 1.

        `chunk_rows` rows at a time: their neighbours closer than 2r (KD-trees), the overlaps of those pairs i < j,
        and only the positive ones kept (int32 indices, float32 values), so that the memory grows with the stored
        overlaps and a chunk's candidate pairs, not with all the map's candidate pairs at once."""
        _check_fov(radius, fov_deg)
        poses = np.asarray(poses, dtype=np.float64)
        if poses.ndim != 2 or poses.shape[1] != 3:
            raise ValueError(f"poses must be (N, 3), got {poses.shape}")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
        _check_finite_poses(poses)
        n = len(poses)
        index = np.int32 if n < 2**31 else np.int64
        tree = cKDTree(poses[:, :2])
        upper = [(np.zeros(0, index), np.zeros(0, index), np.zeros(0, np.float32))]      # pairs i < j
        for start in range(0, n, chunk_rows):
            block = cKDTree(poses[start:start + chunk_rows, :2])
            near = block.sparse_distance_matrix(tree, 2 * radius, output_type="ndarray")
            i, j = near["i"] + start, near["j"]
            i, j = i[j > i], j[j > i]
            values = fov_overlap(poses[i], poses[j], radius, fov_deg).astype(np.float32)
            keep = values > 0
            upper.append((i[keep].astype(index), j[keep].astype(index), values[keep]))
        i, j, v = (np.concatenate(column) for column in zip(*upper))
        upper.clear()
        diagonal = np.arange(n, dtype=index)
        rows, cols = np.concatenate([i, j, diagonal]), np.concatenate([j, i, diagonal])
        data = np.concatenate([v, v, np.ones(n, np.float32)])
        del i, j, v
        matrix = scipy.sparse.csr_matrix((data, (rows, cols)), shape=(n, n), dtype=np.float32)
        return cls(matrix, radius, fov_deg)

    def lookup(self, rows, cols) -> np.ndarray:
        """Dense (len(rows), len(cols)) overlaps for map indices; index -1 (padding) gives 0."""
        return self.lookup_batch(np.asarray(rows, np.int64)[None], np.asarray(cols, np.int64)[None])[0]

    def lookup_batch(self, rows, cols=None) -> np.ndarray:
        """Dense (B, R, C) overlaps for a batch of (B, R) row and (B, C) column map indices (`cols` defaults to
        `rows`: the candidates' own K x K affinities); index -1 (padding) gives 0. One CSR slice of all rows;
        each stored neighbour finds its column by binary search among the batch's sorted (query, column) keys,
        so the cost grows with the neighbours read, never with the map's size."""
        rows = np.asarray(rows, dtype=np.int64)
        cols = rows if cols is None else np.asarray(cols, dtype=np.int64)
        if rows.ndim != 2 or cols.ndim != 2 or len(rows) != len(cols):
            raise ValueError(f"rows and cols must be (B, R) and (B, C), got {rows.shape} and {cols.shape}")
        for name, idx in (("rows", rows), ("cols", cols)):
            if idx.size and (idx.max() >= self.size or idx.min() < -1):
                raise IndexError(f"{name} index out of range for a map of {self.size} images")
        b, r, c = rows.shape[0], rows.shape[1], cols.shape[1]
        out = np.zeros((b * r, c), dtype=np.float32)
        if not (rows.size and cols.size):
            return out.reshape(b, r, c)
        # Key (query, map index) of every asked column; padding gets a distinct negative key that never matches.
        keys = np.arange(b)[:, None] * self.size + cols
        keys = np.where(cols >= 0, keys, -1 - np.arange(b * c).reshape(b, c)).ravel()
        unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        valid = np.flatnonzero(rows.ravel() >= 0)
        block = self.matrix[rows.ravel()[valid]]
        owner = np.repeat(valid, np.diff(block.indptr))                 # flat (query, row) of each stored value
        wanted = (owner // r) * self.size + block.indices
        at = np.minimum(np.searchsorted(unique, wanted), unique.size - 1)
        hit = unique[at] == wanted
        out[owner[hit], first[at[hit]] % c] = block.data[hit]
        # Repeated columns read the value filled in at their first occurrence.
        return np.take_along_axis(out.reshape(b, r, c), (first[inverse] % c).reshape(b, 1, c), axis=2)

    def save(self, path: Path) -> None:
        """Write as an .npz of plain arrays (CSR parts and FoV parameters); no pickles."""
        m = self.matrix
        with open(path, "wb") as f:
            np.savez(f, indptr=m.indptr, indices=m.indices, data=m.data, shape=np.array(m.shape),
                     fov=np.array([self.radius, self.fov_deg]))

    @classmethod
    def load(cls, path: Path) -> "OverlapGraph":
        with np.load(path, allow_pickle=False) as z:
            n = tuple(int(v) for v in z["shape"])
            matrix = scipy.sparse.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=n)
            radius, fov_deg = (float(v) for v in z["fov"])
        matrix.check_format(full_check=True)
        return cls(matrix, radius, fov_deg)
