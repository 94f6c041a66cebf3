"""A procedural 2-D town: a jittered street grid, blocks of buildings whose facades differ in colour,
material, windows, doors and shop signs (a few styles deliberately repeated across the town, because
perceptual aliasing is what re-ranking exists to solve), parks, trees, street lamps and parked cars.

Coordinates are local metres: x east, y north. Everything is drawn from one seeded generator.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import shapely
from shapely.geometry.polygon import orient

# Plausible facade colours (RGB): brick, sandstone, plaster pastels, greys, white.
WALL_PALETTE = np.array([
    [150, 72, 52], [170, 90, 60], [120, 58, 44], [196, 170, 128], [214, 196, 160], [228, 220, 200],
    [200, 200, 196], [150, 150, 150], [110, 112, 118], [235, 232, 225], [226, 200, 120], [190, 210, 190],
    [170, 196, 214], [224, 170, 150], [200, 120, 90], [160, 170, 120], [240, 214, 180], [90, 90, 100],
], dtype=np.float32)
SIGN_PALETTE = np.array([
    [200, 30, 40], [20, 80, 170], [30, 140, 60], [240, 190, 20], [30, 30, 30], [230, 110, 20],
    [120, 40, 140], [0, 150, 160], [250, 250, 250],
], dtype=np.float32)
CAR_PALETTE = np.array([
    [200, 200, 205], [30, 30, 35], [150, 20, 25], [20, 50, 120], [120, 125, 130], [240, 240, 240],
    [60, 90, 60], [200, 160, 40],
], dtype=np.float32)

TREE, LAMP, CAR = 0, 1, 2
GROUND_SIDEWALK, GROUND_ASPHALT, GROUND_GRASS, GROUND_MARKING = 0, 1, 2, 3


@dataclass(frozen=True)
class TownConfig:
    """Size and character of a generated town."""

    blocks_x: int = 5
    blocks_y: int = 4
    block_min_m: float = 60.0
    block_max_m: float = 105.0
    node_jitter_m: float = 5.0
    road_half_width_m: float = 6.0      # centreline to kerb
    sidewalk_m: float = 3.5             # kerb to facade
    park_fraction: float = 0.12
    n_styles: int = 60
    n_repeated_styles: int = 4          # "chain" facades that appear all over the town
    repeated_fraction: float = 0.18
    ground_resolution_m: float = 0.25

    def __post_init__(self) -> None:
        if self.blocks_x < 1 or self.blocks_y < 1:
            raise ValueError("a town needs at least one block in each direction")
        if not 0 < self.block_min_m <= self.block_max_m:
            raise ValueError("block sizes must satisfy 0 < block_min_m <= block_max_m")
        if 2 * (self.road_half_width_m + self.sidewalk_m) + 10 > self.block_min_m:
            raise ValueError("blocks are too small for the streets around them")

    @property
    def street_half_width_m(self) -> float:
        return self.road_half_width_m + self.sidewalk_m


@dataclass
class FacadeStyles:
    """Per-style appearance parameters (arrays of length S)."""

    wall: np.ndarray          # (S, 3) RGB
    trim: np.ndarray          # (S, 3) cornice / window frames
    material: np.ndarray      # (S,) 0 plaster, 1 brick, 2 horizontal panels
    floor_h: np.ndarray       # (S,) metres per upper floor
    ground_h: np.ndarray      # (S,) ground-floor height
    win_pitch: np.ndarray     # (S,) horizontal window spacing
    win_w: np.ndarray         # (S,) window width
    win_h: np.ndarray         # (S,) window height
    shop: np.ndarray          # (S,) bool: shop front with display windows and a sign
    sign: np.ndarray          # (S, 3) sign colour
    sign_w: np.ndarray        # (S,) sign width
    awning: np.ndarray        # (S,) bool
    door: np.ndarray          # (S, 3) door colour


@dataclass
class Town:
    """Streets, facades, objects and a ground raster of one town."""

    config: TownConfig
    nodes: np.ndarray         # (N, 2) street intersections
    edges: np.ndarray         # (E, 2) node index pairs: street segments
    facade_p0: np.ndarray     # (F, 2) facade start (building on the left when walking p0 -> p1)
    facade_p1: np.ndarray     # (F, 2)
    facade_height: np.ndarray  # (F,)
    facade_style: np.ndarray  # (F,) index into styles
    styles: FacadeStyles
    objects: np.ndarray       # (O, 2) positions of trees, lamps and parked cars
    object_kind: np.ndarray   # (O,) TREE / LAMP / CAR
    object_size: np.ndarray   # (O,) tree canopy radius, lamp height or car length
    object_colour: np.ndarray  # (O, 3)
    ground: np.ndarray        # (Hg, Wg) uint16 ground code: class * 256 + shade (0-255), row 0 = north edge
    ground_origin: np.ndarray  # (2,) world x, y of ground pixel (row 0, col 0) corner
    sun_azimuth_deg: float

    @property
    def extent(self) -> tuple[float, float, float, float]:
        """(xmin, ymin, xmax, ymax) of the street network."""
        return (*self.nodes.min(axis=0), *self.nodes.max(axis=0))


def generate_town(config: TownConfig, seed: int) -> Town:
    """Generate a town deterministically from `seed`."""
    rng = np.random.default_rng(seed)
    nx, ny = config.blocks_x + 1, config.blocks_y + 1
    xs = np.concatenate([[0.0], np.cumsum(rng.uniform(config.block_min_m, config.block_max_m, nx - 1))])
    ys = np.concatenate([[0.0], np.cumsum(rng.uniform(config.block_min_m, config.block_max_m, ny - 1))])
    grid = np.stack(np.meshgrid(xs, ys, indexing="ij"), axis=-1)            # (nx, ny, 2)
    grid = grid + rng.uniform(-config.node_jitter_m, config.node_jitter_m, grid.shape)
    nodes = grid.reshape(-1, 2)
    node_id = np.arange(nx * ny).reshape(nx, ny)
    edges = np.concatenate([
        np.stack([node_id[:-1, :].ravel(), node_id[1:, :].ravel()], axis=1),
        np.stack([node_id[:, :-1].ravel(), node_id[:, 1:].ravel()], axis=1),
    ])
    styles = _make_styles(rng, config.n_styles)

    p0s, p1s, heights, style_ids, objects = [], [], [], [], []
    parks = []
    for i in range(nx - 1):
        for j in range(ny - 1):
            quad = shapely.Polygon(nodes[[node_id[i, j], node_id[i + 1, j], node_id[i + 1, j + 1], node_id[i, j + 1]]])
            inset = orient(quad.buffer(-config.street_half_width_m, join_style="mitre"), sign=1.0)
            if rng.random() < config.park_fraction:
                parks.append(inset)
                objects.extend(_park_trees(rng, inset))
                continue
            ring = np.asarray(inset.exterior.coords)[:-1]
            for a, b in zip(ring, np.roll(ring, -1, axis=0)):
                _split_frontages(rng, config, a, b, p0s, p1s, heights, style_ids)
    # An outer ring of buildings across the perimeter streets, so the town does not end in a void.
    # Walked clockwise, the streets lie on the right of the ring, as for the blocks' facades.
    perimeter = np.concatenate([grid[:, 0], grid[-1, 1:], grid[-2::-1, -1], grid[0, -2:0:-1]])
    outer = orient(shapely.Polygon(perimeter).buffer(config.street_half_width_m, join_style="mitre"), sign=-1.0)
    ring = np.asarray(outer.exterior.coords)[:-1]
    for a, b in zip(ring, np.roll(ring, -1, axis=0)):
        _split_frontages(rng, config, a, b, p0s, p1s, heights, style_ids)
    objects.extend(_street_furniture(rng, config, nodes, edges))
    kinds = np.array([o[0] for o in objects], dtype=np.int64)
    town = Town(
        config=config, nodes=nodes, edges=edges,
        facade_p0=np.array(p0s), facade_p1=np.array(p1s), facade_height=np.array(heights),
        facade_style=np.array(style_ids, dtype=np.int64), styles=styles,
        objects=np.array([o[1] for o in objects], dtype=np.float64), object_kind=kinds,
        object_size=np.array([o[2] for o in objects], dtype=np.float64),
        object_colour=np.array([o[3] for o in objects], dtype=np.float32),
        ground=np.zeros((0, 0), np.uint16), ground_origin=np.zeros(2), sun_azimuth_deg=float(rng.uniform(0, 360)),
    )
    town.ground, town.ground_origin = _paint_ground(town, parks, rng)
    return town


def _make_styles(rng: np.random.Generator, n: int) -> FacadeStyles:
    wall = WALL_PALETTE[rng.integers(len(WALL_PALETTE), size=n)] * rng.uniform(0.85, 1.1, (n, 1))
    trim_light = rng.random(n) < 0.5
    trim = np.where(trim_light[:, None], np.clip(wall * 1.25 + 30, 0, 255), wall * 0.55)
    win_pitch = rng.uniform(2.4, 4.6, n)
    return FacadeStyles(
        wall=np.clip(wall, 0, 255).astype(np.float32), trim=trim.astype(np.float32),
        material=rng.choice(3, size=n, p=[0.5, 0.3, 0.2]),
        floor_h=rng.uniform(2.9, 3.7, n), ground_h=rng.uniform(3.4, 4.8, n),
        win_pitch=win_pitch, win_w=win_pitch * rng.uniform(0.35, 0.7, n), win_h=rng.uniform(1.2, 2.0, n),
        shop=rng.random(n) < 0.45, sign=SIGN_PALETTE[rng.integers(len(SIGN_PALETTE), size=n)],
        sign_w=rng.uniform(3.0, 9.0, n), awning=rng.random(n) < 0.3,
        door=SIGN_PALETTE[rng.integers(len(SIGN_PALETTE), size=n)] * 0.6,
    )


def _split_frontages(rng, config: TownConfig, a, b, p0s, p1s, heights, style_ids) -> None:
    """Cut one block side into building frontages 8-24 m wide, each with its own style and height."""
    length = float(np.hypot(*(b - a)))
    direction = (b - a) / max(length, 1e-9)
    pos = 0.0
    while pos < length - 1e-6:
        width = rng.uniform(8.0, 24.0)
        if length - (pos + width) < 6.0:
            width = length - pos
        if rng.random() < config.repeated_fraction:
            style = int(rng.integers(config.n_repeated_styles))
        else:
            style = int(rng.integers(config.n_repeated_styles, config.n_styles))
        p0s.append(a + direction * pos)
        p1s.append(a + direction * (pos + width))
        heights.append(rng.choice([rng.uniform(6, 12), rng.uniform(10, 22)], p=[0.55, 0.45]))
        style_ids.append(style)
        pos += width


def _park_trees(rng, inset) -> list:
    xmin, ymin, xmax, ymax = inset.bounds
    trees = []
    for _ in range(int(rng.integers(8, 16))):
        p = rng.uniform([xmin, ymin], [xmax, ymax])
        if inset.contains(shapely.Point(p)):
            trees.append((TREE, p, rng.uniform(2.5, 4.5), _tree_colour(rng)))
    return trees


def _tree_colour(rng) -> np.ndarray:
    return np.array([50, 110, 45], np.float32) * rng.uniform(0.75, 1.2, 3).astype(np.float32)


def _street_furniture(rng, config: TownConfig, nodes, edges) -> list:
    """Trees and lamps on the sidewalks, cars parked along the kerbs."""
    items = []
    for a, b in nodes[edges]:
        length = float(np.hypot(*(b - a)))
        along = (b - a) / length
        right = np.array([along[1], -along[0]])
        margin = config.street_half_width_m + 2.0   # keep clear of intersections
        for side in (1.0, -1.0):
            offset = right * side
            if rng.random() < 0.6:  # a tree-lined side
                for s in np.arange(margin + rng.uniform(0, 8), length - margin, rng.uniform(9, 16)):
                    items.append((TREE, a + along * s + offset * (config.road_half_width_m + 1.2),
                                  rng.uniform(2.0, 3.6), _tree_colour(rng)))
            if side > 0:
                for s in np.arange(margin + rng.uniform(0, 10), length - margin, rng.uniform(25, 35)):
                    items.append((LAMP, a + along * s + offset * (config.road_half_width_m + 0.5),
                                  rng.uniform(5.0, 7.0), np.array([70, 72, 75], np.float32)))
            for s in np.arange(margin + rng.uniform(0, 6), length - margin, 6.5):
                if rng.random() < 0.35:
                    items.append((CAR, a + along * s + offset * (config.road_half_width_m - 1.1),
                                  rng.uniform(4.0, 4.8), CAR_PALETTE[rng.integers(len(CAR_PALETTE))]))
    return items


def _paint_ground(town: Town, parks: list, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Top-down raster of ground classes (sidewalk everywhere, asphalt streets, markings, grass in parks)
    and a shade per pixel (grain, paving joints), packed as class * 256 + shade."""
    cfg = town.config
    res = cfg.ground_resolution_m
    margin = cfg.street_half_width_m + 60.0
    xmin, ymin, xmax, ymax = town.extent
    origin = np.array([xmin - margin, ymax + margin])     # top-left corner (north-west)
    w = int(np.ceil((xmax - xmin + 2 * margin) / res))
    h = int(np.ceil((ymax - ymin + 2 * margin) / res))
    ground = np.full((h, w), GROUND_SIDEWALK, np.uint8)

    def px(p):
        return np.round(np.stack([(p[..., 0] - origin[0]) / res, (origin[1] - p[..., 1]) / res], -1)).astype(np.int32)

    for park in parks:
        cv2.fillPoly(ground, [px(np.asarray(park.exterior.coords))], GROUND_GRASS)
    road_px = int(round(2 * cfg.road_half_width_m / res))
    for a, b in town.nodes[town.edges]:
        cv2.line(ground, tuple(px(a)), tuple(px(b)), GROUND_ASPHALT, road_px)
    for a, b in town.nodes[town.edges]:  # dashed centre lines, kept clear of intersections
        length = float(np.hypot(*(b - a)))
        along = (b - a) / length
        for s in np.arange(cfg.street_half_width_m + 2, length - cfg.street_half_width_m - 2, 6.0):
            cv2.line(ground, tuple(px(a + along * s)), tuple(px(a + along * (s + 3.0))), GROUND_MARKING,
                     max(1, int(round(0.15 / res))))
    grain = cv2.GaussianBlur(rng.normal(0, 1, (256, 256)).astype(np.float32), (0, 0), 1.2)
    grain /= grain.std()
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    shade = 128.0 + 10.0 * grain[rows % 256, cols % 256]
    paving = (ground == GROUND_SIDEWALK) & ((rows // 2 + cols // 2) % 2 == 0)   # 0.5 m slabs
    shade[paving] -= 9.0
    return ground.astype(np.uint16) * 256 + np.clip(shade, 0, 255).astype(np.uint16), origin
