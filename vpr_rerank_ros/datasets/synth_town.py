"""The synthetic town dataset: drives through procedural towns rendered under changing conditions,
written in the Mapillary SLS layout (and as ROS 2 bags, see `vpr_rerank_ros.bag`).

Each city is a town placed at a real site, so its positions are genuine WGS84 / UTM. The database
drives every street in both directions; query drives are shorter walks under other conditions, like
MSLS's. Everything follows from the seed: the same seed gives byte-identical CSVs and images.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import multiprocessing
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
import shapely

from ..bag import STATUS_FIX, STATUS_NO_FIX, GpsFix, TruthPose, write_drive_bag
from ..geo import UtmZone, latlon_to_utm, meridian_convergence_deg, utm_to_latlon
from ..images import encode_jpeg
from .msls import write_side
from .street_render import Condition, StreetRenderer
from .town import Town, TownConfig, generate_town

# Real places to put towns (lat, lon). The third straddles the UTM 31/32 zone border on purpose.
SITES = [(55.7047, 13.1910), (-34.6037, -58.3816), (47.3769, 5.9990), (30.2672, -97.7431),
         (-33.8688, 151.2093), (35.6762, 139.6503)]
DATABASE_EPOCH_MS = 1_546_300_800_000   # 2019-01-01
QUERY_EPOCH_MS = 1_577_836_800_000      # 2020-01-01, so queries are newer than the map (MSLS o2n)
SIDE_IDS = {"database": 0, "query": 1, "bag": 2}


@dataclass(frozen=True)
class SynthConfig:
    """What to generate for each city."""

    town: TownConfig = field(default_factory=TownConfig)
    width: int = 640
    height: int = 480
    hfov_deg: float = 70.0
    frame_spacing_m: float = 4.0
    lane_offset_m: float = 2.0            # right of the centreline
    max_edges_per_sequence: int = 10      # database sequences are cut after this many streets
    query_sequences: int = 12
    query_frames: int = 30
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if self.frame_spacing_m <= 0 or self.query_sequences < 1 or self.query_frames < 1:
            raise ValueError("frame spacing, query sequences and query frames must be positive")


@dataclass(frozen=True)
class Shot:
    """One frame to render: where, how it looks, and what MSLS records about it."""

    key: str
    sequence_key: str
    frame_number: int
    x: float                  # town metres (east)
    y: float                  # town metres (north)
    heading: float            # degrees clockwise from UTM grid north
    pitch: float
    condition: Condition
    seed: int
    captured_at_ms: int


@dataclass
class CityPlan:
    """A city's town, where it lies on Earth, and its database and query shots."""

    name: str
    town: Town
    origin_en: np.ndarray     # UTM easting/northing of the town's (0, 0)
    zone: UtmZone
    database: list
    query: list

    def to_utm(self, x, y) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(x) + self.origin_en[0], np.asarray(y) + self.origin_en[1]


def city_name(index: int) -> str:
    return f"synth{index}"


def _sub_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def _key(*parts) -> str:
    """An MSLS-like 22-character image key, unique per (city, side, sequence, frame)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=16).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


# --------------------------------------------------------------------------- planning


def plan_city(config: SynthConfig, seed: int, index: int) -> CityPlan:
    """Lay out city `index` of a dataset and plan its drives (no rendering)."""
    town = generate_town(config.town, _sub_seed(seed, index, 0))
    lat, lon = SITES[index % len(SITES)]
    lat += 0.05 * (index // len(SITES))
    east, north, zone = latlon_to_utm(lat, lon)
    xmin, ymin, xmax, ymax = town.extent
    origin = np.array([float(east) - (xmin + xmax) / 2, float(north) - (ymin + ymax) / 2])
    rng = np.random.default_rng(_sub_seed(seed, index, 1))
    name = city_name(index)
    database = []
    for s, route in enumerate(_covering_routes(town, rng, config.max_edges_per_sequence)):
        database += _shots(config, town, route, rng, _database_condition(rng), name, "database", s, seed)
    query = []
    for s in range(config.query_sequences):
        route = _random_route(town, rng, config.query_frames * config.frame_spacing_m + 40.0)
        shots = _shots(config, town, route, rng, _query_condition(rng), name, "query", s, seed)
        start = int(rng.integers(0, max(1, len(shots) - config.query_frames + 1)))
        query += [replace(sh, frame_number=i) for i, sh in enumerate(shots[start:start + config.query_frames])]
    return CityPlan(name=name, town=town, origin_en=origin, zone=zone, database=database, query=query)


def _adjacency(town: Town) -> list[list[int]]:
    adjacency = [[] for _ in range(len(town.nodes))]
    for a, b in town.edges:
        adjacency[a].append(int(b))
        adjacency[b].append(int(a))
    return adjacency


def _covering_routes(town: Town, rng: np.random.Generator, max_edges: int) -> list[list[int]]:
    """Node paths that together drive every street once in each direction, without U-turns."""
    adjacency = _adjacency(town)
    remaining = sorted({(int(a), int(b)) for a, b in town.edges} | {(int(b), int(a)) for a, b in town.edges})
    todo = set(remaining)
    routes = []
    while todo:
        candidates = [e for e in remaining if e in todo]
        a, b = candidates[int(rng.integers(len(candidates)))]
        path = [a, b]
        todo.discard((a, b))
        while len(path) - 1 < max_edges:
            cur, prev = path[-1], path[-2]
            fresh = [n for n in adjacency[cur] if n != prev and (cur, n) in todo]
            if not fresh:
                break
            nxt = fresh[int(rng.integers(len(fresh)))]
            path.append(nxt)
            todo.discard((cur, nxt))
        routes.append(path)
    return routes


def _random_route(town: Town, rng: np.random.Generator, min_length_m: float) -> list[int]:
    """A random walk without U-turns (except at dead ends) at least `min_length_m` long."""
    adjacency = _adjacency(town)
    a, b = (int(v) for v in town.edges[int(rng.integers(len(town.edges)))])
    path = [a, b] if rng.random() < 0.5 else [b, a]
    length = float(np.hypot(*(town.nodes[path[1]] - town.nodes[path[0]])))
    while length < min_length_m:
        options = [n for n in adjacency[path[-1]] if n != path[-2]] or adjacency[path[-1]]
        path.append(options[int(rng.integers(len(options)))])
        length += float(np.hypot(*(town.nodes[path[-1]] - town.nodes[path[-2]])))
    return path


def route_poses(town: Town, route: list[int], spacing_m: float, lane_offset_m: float,
                start_m: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Positions every `spacing_m` along a node path, `lane_offset_m` right of the centreline, and headings
    from the direction of travel (smoothed over ±3 m, so turns are gradual). Returns ((N, 2), (N,) degrees)."""
    centre = shapely.LineString(town.nodes[route])
    distances = np.arange(start_m, centre.length, spacing_m)
    points = shapely.get_coordinates(shapely.line_interpolate_point(centre, distances))
    ahead = shapely.get_coordinates(shapely.line_interpolate_point(centre, np.minimum(distances + 3.0, centre.length)))
    behind = shapely.get_coordinates(shapely.line_interpolate_point(centre, np.maximum(distances - 3.0, 0.0)))
    tangent = ahead - behind
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    right = np.stack([tangent[:, 1], -tangent[:, 0]], axis=1)
    heading = (90.0 - np.degrees(np.arctan2(tangent[:, 1], tangent[:, 0]))) % 360.0
    return points + lane_offset_m * right, heading


def _shots(config: SynthConfig, town: Town, route, rng, condition: Condition, city: str, side: str,
           sequence: int, seed: int) -> list[Shot]:
    lane = config.lane_offset_m + rng.uniform(-0.5, 0.5)
    points, heading = route_poses(town, route, config.frame_spacing_m, lane, rng.uniform(0, config.frame_spacing_m))
    epoch = DATABASE_EPOCH_MS if side == "database" else QUERY_EPOCH_MS
    start_ms = epoch + int(rng.integers(0, 300)) * 86_400_000 + int(rng.integers(0, 86_400)) * 1000
    sequence_key = _key(seed, city, side, "sequence", sequence)
    side_id = SIDE_IDS[side]
    return [Shot(key=_key(seed, city, side, sequence, i), sequence_key=sequence_key, frame_number=i,
                 x=float(p[0]), y=float(p[1]), heading=float((h + rng.normal(0, 1.5)) % 360.0),
                 pitch=float(rng.normal(0, 1.0)), condition=condition,
                 seed=_sub_seed(seed, zlib.crc32(city.encode()), side_id, sequence, i),
                 captured_at_ms=start_ms + i * int(1000 * config.frame_spacing_m / 8.0))
            for i, (p, h) in enumerate(zip(points, heading))]


def _database_condition(rng: np.random.Generator) -> Condition:
    """Maps are mostly captured by day in good weather."""
    return Condition(time=str(rng.choice(["day", "day", "day", "dusk"])),
                     weather=str(rng.choice(["clear", "clear", "overcast"])),
                     season=str(rng.choice(["summer", "summer", "autumn"])),
                     camera_height_m=float(rng.uniform(1.45, 2.1)), traffic=float(rng.uniform(0.05, 0.25)))


def _query_condition(rng: np.random.Generator) -> Condition:
    """Queries come at any time, in any weather and season."""
    return Condition(time=str(rng.choice(["day", "day", "dusk", "night"])),
                     weather=str(rng.choice(["clear", "overcast", "fog", "rain"])),
                     season=str(rng.choice(["summer", "autumn", "winter"])),
                     camera_height_m=float(rng.uniform(1.45, 2.1)), traffic=float(rng.uniform(0.1, 0.4)))


# --------------------------------------------------------------------------- rendering and writing

_WORKER: dict = {}


def _init_worker(config: SynthConfig, town: Town) -> None:
    _WORKER["renderer"] = StreetRenderer(town, config.width, config.height, config.hfov_deg)
    _WORKER["quality"] = config.jpeg_quality


def render_shot(renderer: StreetRenderer, shot: Shot) -> np.ndarray:
    """RGB frame of one shot."""
    return renderer.render(shot.x, shot.y, shot.heading, shot.condition, seed=shot.seed, pitch_deg=shot.pitch)


def _render_to_file(job: tuple[Shot, str]) -> None:
    shot, path = job
    Path(path).write_bytes(encode_jpeg(render_shot(_WORKER["renderer"], shot), _WORKER["quality"]))


def write_city(root: str | Path, plan: CityPlan, config: SynthConfig, workers: int = 1,
               progress: bool = False) -> None:
    """Render a planned city into `root` in the MSLS layout (train_val/<city>/{query,database})."""
    for side, shots in (("database", plan.database), ("query", plan.query)):
        directory = Path(root) / "train_val" / plan.name / side
        (directory / "images").mkdir(parents=True, exist_ok=True)
        jobs = [(shot, str(directory / "images" / f"{shot.key}.jpg")) for shot in shots]
        _render_all(jobs, config, plan.town, workers, progress, f"{plan.name}/{side}")
        _write_side_csvs(directory, plan, shots, side)


def _render_all(jobs, config: SynthConfig, town: Town, workers: int, progress: bool, label: str) -> None:
    from tqdm import tqdm

    bar = tqdm(total=len(jobs), desc=label, unit="img", disable=not progress)
    if workers <= 1:
        _init_worker(config, town)
        for job in jobs:
            _render_to_file(job)
            bar.update()
    else:
        with multiprocessing.get_context("fork").Pool(workers, _init_worker, (config, town)) as pool:
            for _ in pool.imap_unordered(_render_to_file, jobs, chunksize=16):
                bar.update()
    bar.close()


def _write_side_csvs(directory: Path, plan: CityPlan, shots: list, side: str) -> None:
    x = np.array([s.x for s in shots])
    y = np.array([s.y for s in shots])
    easting, northing = plan.to_utm(x, y)
    lat, lon = utm_to_latlon(easting, northing, plan.zone)
    grid_heading = np.array([s.heading for s in shots])
    # MSLS `ca` is a compass angle (true north); the town is drawn on the UTM grid.
    compass = (grid_heading + meridian_convergence_deg(lat, lon, plan.zone)) % 360.0
    conditions = [s.condition for s in shots]
    night = np.array([c.time == "night" for c in conditions])
    season = np.array([c.season for c in conditions])
    time = np.array([c.time for c in conditions])
    query = side == "query"
    subtasks = {  # the synthetic town's reading of MSLS's subtasks: queries are newer than the map
        "all": np.ones(len(shots), bool),
        "s2w": season == ("winter" if query else "summer"),
        "w2s": season == ("summer" if query else "winter"),
        "o2n": np.full(len(shots), True),
        "n2o": np.full(len(shots), False),
        "d2n": time == ("night" if query else "day"),
        "n2d": time == ("day" if query else "night"),
    }
    write_side(directory, keys=[s.key for s in shots], lat=lat, lon=lon, heading=compass,
               captured_at=[s.captured_at_ms for s in shots], easting=easting, northing=northing,
               sequence_key=[s.sequence_key for s in shots], frame_number=[s.frame_number for s in shots],
               night=night, subtasks=subtasks)
    with open(directory / "synth_conditions.csv", "w") as f:  # not part of MSLS: for per-condition analysis
        f.write("key,time,weather,season,camera_height_m\n")
        for s in shots:
            c = s.condition
            f.write(f"{s.key},{c.time},{c.weather},{c.season},{c.camera_height_m:.3f}\n")


def generate(out: str | Path, cities: int = 3, seed: int = 0, config: SynthConfig | None = None,
             workers: int = 1, progress: bool = False) -> list[CityPlan]:
    """Generate `cities` towns into an MSLS directory; returns their plans."""
    config = config or SynthConfig()
    if cities < 1:
        raise ValueError("cities must be at least 1")
    out = Path(out)
    plans = [plan_city(config, seed, i) for i in range(cities)]
    for plan in plans:
        write_city(out, plan, config, workers, progress)
    summary = {"generator": "vpr_rerank_ros.datasets.synth_town", "seed": seed, "config": asdict(config),
               "cities": {p.name: {"utm_zone": str(p.zone), "database": len(p.database), "query": len(p.query)}
                          for p in plans}}
    (out / "synth_town.json").write_text(json.dumps(summary, indent=2) + "\n")
    return plans


def contact_sheet(plan: CityPlan, config: SynthConfig, pairs: int = 6, seed: int = 0,
                  tile_width: int = 320) -> np.ndarray:
    """RGB image of query frames (left) beside the nearest database frame (right), labelled with conditions."""
    renderer = StreetRenderer(plan.town, config.width, config.height, config.hfov_deg)
    rng = np.random.default_rng(seed)
    db_xy = np.array([[s.x, s.y] for s in plan.database])
    db_heading = np.array([s.heading for s in plan.database])
    rows = []
    picks = rng.choice(len(plan.query), size=min(pairs, len(plan.query)), replace=False)
    for q in sorted(picks, key=lambda i: (plan.query[i].condition.time, plan.query[i].condition.weather)):
        shot = plan.query[q]
        cost = np.hypot(*(db_xy - [shot.x, shot.y]).T) + 0.2 * np.abs((db_heading - shot.heading + 180) % 360 - 180)
        match = plan.database[int(np.argmin(cost))]
        tiles = []
        for s in (shot, match):
            rgb = render_shot(renderer, s)
            tile = cv2.resize(rgb, (tile_width, tile_width * config.height // config.width), interpolation=cv2.INTER_AREA)
            c = s.condition
            label = f"{'Q' if s is shot else 'DB'} {c.time} {c.weather} {c.season}"
            cv2.putText(tile, label, (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 3, cv2.LINE_AA)
            cv2.putText(tile, label, (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
            tiles.append(tile)
        rows.append(np.hstack(tiles))
    return np.vstack(rows)


# --------------------------------------------------------------------------- drive bags


@dataclass(frozen=True)
class BagConfig:
    """A query drive recorded as a ROS 2 bag: camera rate, speed, and how good the GPS is."""

    length_m: float = 600.0
    fps: float = 5.0
    speed_mps: float = 8.0
    gps_rate_hz: float = 1.0
    gps_noise_m: float = 3.0        # white noise per fix, plus a slowly drifting bias of half that
    dropout_prob: float = 0.05      # per GPS epoch: an outage of 2-5 s begins (no messages)
    no_fix_prob: float = 0.03       # per GPS epoch: a NO_FIX message with NaN position
    compressed: bool = True         # CompressedImage (jpeg) or Image (rgb8)
    storage: str = "mcap"           # or "sqlite3"
    time: str | None = None         # the drive's light, weather and season; None: drawn like any query drive's
    weather: str | None = None
    season: str | None = None

    def __post_init__(self) -> None:
        if min(self.length_m, self.fps, self.speed_mps, self.gps_rate_hz) <= 0 or self.gps_noise_m < 0:
            raise ValueError("bag length, rates and speed must be positive and GPS noise non-negative")

    def condition(self, drawn: Condition) -> Condition:
        """The drive's condition: `drawn` with the fields this config fixes (checked by Condition)."""
        fixed = {name: getattr(self, name) for name in ("time", "weather", "season") if getattr(self, name)}
        return replace(drawn, **fixed)


def plan_bag_drive(plan: CityPlan, config: SynthConfig, bag: BagConfig, seed: int) -> tuple[list, list, list]:
    """Shots (with stamps in `captured_at_ms`), GPS fixes and ground-truth poses of one query drive."""
    rng = np.random.default_rng(_sub_seed(seed, zlib.crc32(plan.name.encode()), SIDE_IDS["bag"]))
    spacing = bag.speed_mps / bag.fps
    route = _random_route(plan.town, rng, bag.length_m + 20.0)
    points, heading = route_poses(plan.town, route, spacing, config.lane_offset_m, 0.0)
    n = max(2, min(len(points), int(bag.length_m / spacing) + 1))
    condition = bag.condition(_query_condition(rng))
    start_ns = QUERY_EPOCH_MS * 1_000_000 + int(rng.integers(0, 300 * 86_400)) * 1_000_000_000
    stamps = start_ns + (np.arange(n) * 1e9 / bag.fps).astype(np.int64)
    shots = [Shot(key=_key(seed, plan.name, "bag", i), sequence_key=_key(seed, plan.name, "bag"), frame_number=i,
                  x=float(points[i, 0]), y=float(points[i, 1]), heading=float(heading[i]),
                  pitch=float(rng.normal(0, 1.0)), condition=condition,
                  seed=_sub_seed(seed, zlib.crc32(plan.name.encode()), SIDE_IDS["bag"], i),
                  captured_at_ms=int(stamps[i] // 1_000_000)) for i in range(n)]
    easting, northing = plan.to_utm(points[:n, 0], points[:n, 1])
    truth = [TruthPose(int(t), float(e), float(nn), float(h), plan.zone)
             for t, e, nn, h in zip(stamps, easting, northing, heading[:n])]

    fixes, bias, outage_until = [], np.zeros(2), -1
    epochs = np.arange(stamps[0], stamps[-1] + 1, int(1e9 / bag.gps_rate_hz), dtype=np.int64)
    tau_s, dt = 30.0, 1.0 / bag.gps_rate_hz
    for t in epochs:
        bias = bias * math.exp(-dt / tau_s) + rng.normal(0, bag.gps_noise_m / 2 * math.sqrt(1 - math.exp(-2 * dt / tau_s)), 2)
        if t < outage_until:
            continue
        if rng.random() < bag.dropout_prob:
            outage_until = t + int(rng.uniform(2, 5) * 1e9)
            continue
        if rng.random() < bag.no_fix_prob:
            fixes.append(GpsFix(int(t), float("nan"), float("nan"), float("nan"), STATUS_NO_FIX, bag.gps_noise_m))
            continue
        e = np.interp(t, stamps, easting) + bias[0] + rng.normal(0, bag.gps_noise_m)
        nn = np.interp(t, stamps, northing) + bias[1] + rng.normal(0, bag.gps_noise_m)
        lat, lon = utm_to_latlon(e, nn, plan.zone)
        fixes.append(GpsFix(int(t), float(lat), float(lon), 30.0, STATUS_FIX, max(bag.gps_noise_m, 0.5)))
    return shots, fixes, truth


def write_bag(path: str | Path, plan: CityPlan, config: SynthConfig, bag: BagConfig, seed: int) -> Path:
    """Render a query drive through a planned city into a ROS 2 bag directory."""
    shots, fixes, truth = plan_bag_drive(plan, config, bag, seed)
    renderer = StreetRenderer(plan.town, config.width, config.height, config.hfov_deg)
    frames = ((t.stamp_ns, render_shot(renderer, s)) for s, t in zip(shots, truth))
    return write_drive_bag(path, frames, fixes, truth, compressed=bag.compressed, storage=bag.storage,
                           jpeg_quality=config.jpeg_quality)
