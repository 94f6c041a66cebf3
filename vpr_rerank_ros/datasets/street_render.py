"""A vectorized 2.5-D ray caster that renders forward-facing street-level photos of a `Town`.

One ray per image column against the facade segments gives each column a wall (distance, facade,
position along it); walls are shaded procedurally (material, windows, shop fronts, signs), the ground
is floor-cast from the town's ground raster, objects (trees, lamps, cars, passing vehicles) are
depth-tested billboards, and the viewing condition (time of day, weather, season) changes light,
colours, fog, rain and lit windows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from .town import CAR, GROUND_ASPHALT, GROUND_MARKING, LAMP, TREE, Town

TIMES = ("day", "dusk", "night")
# Facade pixel classes, in the order of StreetRenderer._facade_palette.
_WALL, _MORTAR, _PANEL_LINE, _TRIM, _GLASS, _LIT_WINDOW, _DISPLAY, _SIGN, _LETTERS, _AWNING, _DOOR = range(11)
WEATHERS = ("clear", "overcast", "fog", "rain")
SEASONS = ("summer", "autumn", "winter")


@dataclass(frozen=True)
class Condition:
    """How a traversal looks: light, weather, season, camera mounting and traffic."""

    time: str = "day"
    weather: str = "clear"
    season: str = "summer"
    camera_height_m: float = 1.7
    traffic: float = 0.15       # probability that a vehicle drives ahead in the frame

    def __post_init__(self) -> None:
        for value, allowed, name in ((self.time, TIMES, "time"), (self.weather, WEATHERS, "weather"),
                                     (self.season, SEASONS, "season")):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")

    @property
    def night(self) -> bool:
        return self.time == "night"


# Light level on lit surfaces, sky colours at horizon and zenith, and the share of lit windows.
_LIGHT = {"day": 1.0, "dusk": 0.55, "night": 0.16}
_SKY = {
    "day": ([200, 220, 240], [90, 140, 210]),
    "dusk": ([250, 170, 110], [70, 70, 130]),
    "night": ([40, 40, 60], [5, 8, 20]),
}
_LIT_WINDOWS = {"day": 0.0, "dusk": 0.3, "night": 0.55}
_GROUND_COLOURS = {  # sidewalk, asphalt, grass, marking
    "summer": [[165, 160, 152], [78, 80, 84], [80, 130, 60], [225, 225, 215]],
    "autumn": [[160, 152, 140], [72, 74, 78], [120, 120, 60], [215, 215, 205]],
    "winter": [[225, 228, 232], [95, 98, 104], [232, 236, 240], [200, 200, 195]],
}
_CANOPY_TINT = {"summer": [1.0, 1.0, 1.0], "autumn": [2.6, 1.3, 0.45], "winter": [0.0, 0.0, 0.0]}


class StreetRenderer:
    """Renders (H, W, 3) uint8 RGB frames of one town for a pinhole camera."""

    def __init__(self, town: Town, width: int = 640, height: int = 480, hfov_deg: float = 70.0,
                 max_distance_m: float = 250.0) -> None:
        if width < 16 or height < 16:
            raise ValueError(f"image size must be at least 16x16, got {width}x{height}")
        if not 10.0 <= hfov_deg <= 150.0:
            raise ValueError(f"horizontal field of view must be in [10, 150] degrees, got {hfov_deg}")
        self.town, self.width, self.height = town, int(width), int(height)
        self.hfov_deg, self.max_distance = float(hfov_deg), float(max_distance_m)
        self.focal = (width / 2) / math.tan(math.radians(hfov_deg) / 2)
        self.column_angles = np.arctan((np.arange(width) + 0.5 - width / 2) / self.focal)  # + = right
        self._rows = np.arange(height, dtype=np.float32)[:, None] + 0.5
        rng = np.random.default_rng(12345)
        self._noise = _periodic_noise(rng, (256, 256), 1.0)
        self._clouds = np.clip(_periodic_noise(rng, (128, 1024), 6.0) * 0.5 + 0.3, 0, 1)  # wraps in azimuth
        self._sensor_noise = rng.normal(0.0, 2.0, (height + 32, width + 32, 3)).astype(np.float32)
        t = town
        self._seg_dir = t.facade_p1 - t.facade_p0
        self._seg_len = np.hypot(self._seg_dir[:, 0], self._seg_dir[:, 1])
        normal = np.stack([self._seg_dir[:, 1], -self._seg_dir[:, 0]], 1) / self._seg_len[:, None]
        sun = np.radians(90.0 - t.sun_azimuth_deg)
        self._facade_sunlight = 0.72 + 0.28 * np.clip(normal @ np.array([math.cos(sun), math.sin(sun)]), 0, 1)

    # ------------------------------------------------------------------ public

    def render(self, x: float, y: float, heading_deg: float, condition: Condition = Condition(),
               seed: int = 0, pitch_deg: float = 0.0) -> np.ndarray:
        """The view from (x, y) looking along the compass heading; `seed` drives per-frame details."""
        rng = np.random.default_rng(seed)
        h, w = self.height, self.width
        cam = np.array([x, y], np.float64)
        yaw = math.radians(90.0 - heading_deg)
        ray_angle = yaw - self.column_angles                          # ENU angle of each column's ray
        rays = np.stack([np.cos(ray_angle), np.sin(ray_angle)], 1)  # (W, 2)
        cos_col = np.cos(self.column_angles)
        horizon = h / 2 + math.tan(math.radians(pitch_deg)) * self.focal
        cam_h = condition.camera_height_m

        hit_t, hit_facade, hit_s = self._cast(cam, rays)
        perp = np.where(np.isfinite(hit_t), hit_t * cos_col, 1e6).astype(np.float32)  # along the optical axis
        z = cam_h + (horizon - self._rows) * (perp / self.focal)[None, :]   # wall height seen by each pixel
        has_wall = np.isfinite(hit_t)
        top = np.where(has_wall, self.town.facade_height[np.where(has_wall, hit_facade, 0)], -1.0)
        wall = (z >= 0) & (z <= top[None, :])
        depth = np.full((h, w), np.inf, np.float32)
        image = self._sky(condition, ray_angle, horizon)

        light = _LIGHT[condition.time] * (0.8 if condition.weather in ("overcast", "rain", "fog") else 1.0)
        below = max(0, math.floor(horizon - 0.5) + 1)           # first pixel row whose centre is below the horizon
        if below < h:  # the ground everywhere below the horizon; walls are drawn over it
            ground_perp = cam_h * self.focal / (self._rows[below:] - horizon)           # (n, 1)
            distance = ground_perp / cos_col[None, :].astype(np.float32)                # (n, W)
            lateral = distance * np.sin(self.column_angles).astype(np.float32)[None, :]
            image[below:] = self._ground(cam, rays, distance, lateral, condition, light)
            depth[below:] = distance
        if wall.any():
            image = np.where(wall[..., None], self._facade(hit_facade, hit_s, z, condition, light), image)
            depth = np.where(wall, hit_t[None, :].astype(np.float32), depth)
        self._billboards(image, depth, cam, yaw, horizon, condition, rng, light)
        return self._finish(image, depth, condition, rng)

    # ------------------------------------------------------------------ geometry

    def _cast(self, cam: np.ndarray, rays: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Nearest facade hit per column: distance (inf if none), facade index, position along it (0..1)."""
        p0 = self.town.facade_p0 - cam
        d = self._seg_dir
        # Keep facades that come within max_distance of the camera.
        t_closest = np.clip(-(p0 * d).sum(1) / (self._seg_len ** 2), 0, 1)
        near = np.flatnonzero(np.hypot(*(p0 + d * t_closest[:, None]).T) < self.max_distance)
        p0, d = p0[near], d[near]
        det = rays[:, 1:2] * d[None, :, 0] - rays[:, 0:1] * d[None, :, 1]          # (W, F)
        safe = np.where(np.abs(det) < 1e-12, 1e-12, det)
        t = (p0[None, :, 1] * d[None, :, 0] - p0[None, :, 0] * d[None, :, 1]) / safe
        s = (rays[:, 0:1] * p0[None, :, 1] - rays[:, 1:2] * p0[None, :, 0]) / safe
        t = np.where((t > 0.3) & (s >= 0) & (s <= 1) & (np.abs(det) >= 1e-12), t, np.inf)
        best = np.argmin(t, axis=1) if near.size else np.zeros(len(rays), np.int64)
        cols = np.arange(len(rays))
        hit_t = t[cols, best] if near.size else np.full(len(rays), np.inf)
        hit_s = s[cols, best] if near.size else np.zeros(len(rays))
        hit_facade = near[best] if near.size else np.zeros(len(rays), np.int64)
        return hit_t, hit_facade, hit_s

    # ------------------------------------------------------------------ shading

    def _sky(self, cond: Condition, ray_angle: np.ndarray, horizon: float) -> np.ndarray:
        """(H, W, 3) frame with the sky (gradient and clouds that turn with the camera) above the horizon;
        rows below it are left at the horizon colour, as ground and walls cover all of them."""
        h, w = self.height, self.width
        low, high = (np.array(c, np.float32) for c in _SKY[cond.time])
        if cond.weather in ("overcast", "rain", "fog"):
            grey = np.array([175, 178, 182] if cond.time == "day" else [70, 70, 78], np.float32)
            grey *= 0.4 if cond.night else 1.0
            low, high = 0.25 * low + 0.75 * grey, 0.25 * high + 0.75 * grey
        image = np.empty((h, w, 3), np.float32)
        image[:] = low
        n = int(np.clip(math.ceil(horizon), 0, h))
        if n == 0:
            return image
        above = horizon - self._rows[:n, 0]
        sky = low + (high - low) * np.clip(above / (h * 0.8), 0, 1)[:, None] ** 0.7       # (n, 3)
        az = (((ray_angle % (2 * math.pi)) / (2 * math.pi)) * 1024).astype(np.int64) % 1024
        el = np.clip(above / self.focal * 200, 0, 127).astype(np.int64)
        amount = {"clear": 0.5, "overcast": 0.3, "fog": 0.1, "rain": 0.35}[cond.weather]
        cloud_colour = np.array([245, 245, 250] if cond.time == "day" else [120, 100, 110], np.float32)
        if cond.night:
            amount, cloud_colour = 0.15, np.array([30, 30, 40], np.float32)
        alpha = self._clouds[el[:, None], az[None, :]] * np.float32(amount)              # (n, W)
        image[:n] = sky[:, None, :] + (cloud_colour - sky[:, None, :]) * alpha[..., None]
        return image

    def _ground(self, cam, rays, dist, lateral, cond: Condition, light: float) -> np.ndarray:
        """Floor casting: the world point of each pixel (row, column) of a band below the horizon, `dist`
        metres along its column's ray, looks up the town's ground raster. Returns (n, W, 3)."""
        town, res = self.town, self.town.config.ground_resolution_m
        x = (cam[0] - town.ground_origin[0]) / res + dist * (rays[:, 0] / res).astype(np.float32)[None, :]
        y = (town.ground_origin[1] - cam[1]) / res - dist * (rays[:, 1] / res).astype(np.float32)[None, :]
        rows, cols = town.ground.shape
        index = np.clip(y.astype(np.int32), 0, rows - 1) * cols + np.clip(x.astype(np.int32), 0, cols - 1)
        out = np.take(self._ground_palette(cond), np.take(town.ground.ravel(), index), axis=0)
        if not cond.night:
            return out * np.float32(light)
        # Headlights: a bright cone on the road ahead.
        lit = light + 1.3 * np.exp(-dist / 20.0) * np.exp(-(lateral / (1.2 + 0.2 * dist)) ** 2)
        return out * lit[..., None]

    def _noise_at(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """The tiling noise texture at (a, b) in texels (nearest, wrapped)."""
        index = ((a.astype(np.int32) & 255) << 8) | (b.astype(np.int32) & 255)
        return np.take(self._noise.ravel(), index)

    def _ground_palette(self, cond: Condition) -> np.ndarray:
        """Colour of every ground code (class * 256 + shade) under a condition, (4 * 256, 3)."""
        colours = np.array(_GROUND_COLOURS[cond.season], np.float32)
        if cond.weather == "rain":  # wet asphalt is darker
            colours[[GROUND_ASPHALT, GROUND_MARKING]] *= 0.7
        shade = np.arange(256, dtype=np.float32) / 128.0
        return (colours[:, None, :] * shade[None, :, None]).reshape(-1, 3)

    def _facade(self, facade: np.ndarray, s: np.ndarray, v: np.ndarray, cond: Condition, light: float) -> np.ndarray:
        """(H, W, 3) facade colours for every pixel, given each column's facade and position along it (0..1)
        and each pixel's height `v` on the wall; only the wall pixels of the result are used."""
        town, S = self.town, self.town.styles
        st = town.facade_style[facade]                                # per column
        length = self._seg_len[facade]
        u = (s * length)[None, :].astype(np.float32)                  # metres along the frontage, (1, W)
        centre = u - length[None, :] / 2
        height = town.facade_height[facade][None, :]
        gf, fh, pitch = S.ground_h[st][None, :], S.floor_h[st][None, :], S.win_pitch[st][None, :]
        win_h, shop = S.win_h[st][None, :], S.shop[st][None, :]

        cls = np.full(v.shape, _WALL, np.int64)
        material = S.material[st][None, :]
        brick = material == 1
        if brick.any():  # 0.3 m courses, 0.6 m bricks, every other course shifted by half a brick
            course = v * np.float32(1 / 0.3)
            whole = np.floor(course)
            shifted = u * np.float32(1 / 0.6) + 0.5 * (whole.astype(np.int32) & 1)
            joint = (course - whole < 0.117) | (shifted - np.floor(shifted) < 0.058)
            cls[brick & joint] = _MORTAR
        panels = material == 2
        if panels.any():
            band = v * np.float32(1 / 1.1)
            cls[panels & (band - np.floor(band) < 0.055)] = _PANEL_LINE
        floor = np.floor((v - gf) / fh)
        fv = (v - gf) - floor * fh
        col = np.floor(u / pitch)
        fu = u - col * pitch
        margin = (pitch - S.win_w[st][None, :]) / 2
        upper = (v > gf) & (v < height - 0.9)
        frame = upper & (fu > margin - 0.12) & (fu < pitch - margin + 0.12) & (fv > 0.78) & (fv < 0.92 + win_h)
        glass = frame & (fu > margin) & (fu < pitch - margin) & (fv > 0.9) & (fv < 0.9 + win_h)
        cls[frame] = _TRIM
        window_id = _hash(facade[None, :], floor, col)
        lit = glass & (window_id % 1000 < 1000 * _LIT_WINDOWS[cond.time])
        cls[glass] = _GLASS
        cls[lit] = _LIT_WINDOW
        cls[v > height - 0.45] = _TRIM                                 # cornice
        ground_floor = v <= gf
        display = shop & ground_floor & (v > 0.45) & (v < gf - 1.35) & ((u % 4.0) > 0.45) & (np.abs(centre) > 1.0)
        cls[display] = _DISPLAY
        sign = shop & (v > gf - 1.2) & (v < gf - 0.35) & (np.abs(centre) < S.sign_w[st][None, :] / 2)
        cls[sign] = _SIGN
        rows, cols = np.nonzero(sign)
        letters = self._noise_at(v[rows, cols] * 3.0, u[0, cols] * 3.0) > 0.6
        cls[rows[letters], cols[letters]] = _LETTERS
        cls[shop & S.awning[st][None, :] & (v > gf - 1.35) & (v <= gf - 1.2)] = _AWNING
        cls[~shop & ground_floor & (np.abs(centre) < 0.65) & (v < 2.3)] = _DOOR

        table = self._facade_palette(st, cond)                          # (W, classes, 3)
        index = cls + (np.arange(len(facade)) * table.shape[1])[None, :]
        colour = np.take(table.reshape(-1, 3), index, axis=0)           # (H, W, 3)
        lighting = light * self._facade_sunlight[facade] if cond.time == "day" else np.full(len(facade), light)
        shade = lighting.astype(np.float32)[None, :] * (1.0 + 0.05 * self._noise_at(v * 5.0, u * 5.0))
        unlit_glass = glass & ~lit
        shade[unlit_glass] *= 0.8 + 0.1 * (window_id[unlit_glass] % 5)   # each pane reflects differently
        shade[cls == _LIT_WINDOW] = 1.0
        if cond.time != "day":
            shade[cls == _DISPLAY] = 1.0
        colour *= shade[..., None]
        return colour

    def _facade_palette(self, st: np.ndarray, cond: Condition) -> np.ndarray:
        """Per-column base colour of each facade class, (W, classes, 3)."""
        S = self.town.styles
        wall, trim, sign = S.wall[st], S.trim[st], S.sign[st]
        display = (np.array([250, 235, 200], np.float32) * 0.9 if cond.time != "day"
                   else np.array([60, 70, 78], np.float32))
        rows = [wall, wall * 0.65 + 60, wall * 0.7, trim, np.array([70, 85, 100], np.float32),
                np.array([255, 214, 150], np.float32), display, sign, 250.0 - sign * 0.3, sign * 0.7, S.door[st]]
        return np.stack([np.broadcast_to(r, wall.shape) for r in rows], axis=1).astype(np.float32)

    # ------------------------------------------------------------------ objects

    def _billboards(self, image, depth, cam, yaw, horizon, cond: Condition, rng, light: float) -> None:
        """Trees, lamps and cars of the town plus vehicles in traffic, far to near, depth-tested per pixel."""
        t = self.town
        rel = t.objects - cam
        forward = rel @ np.array([math.cos(yaw), math.sin(yaw)])
        right = rel @ np.array([math.sin(yaw), -math.cos(yaw)])
        # In front, within 80 m, within the view, and at least ~8 pixels wide (2 * size * focal / distance).
        visible = np.flatnonzero((forward > 1.0) & (forward < np.minimum(80.0, self.focal * t.object_size / 4.0))
                                 & (np.abs(right) < forward * math.tan(math.radians(self.hfov_deg) / 2) + 6))
        items = [(forward[i], right[i], int(t.object_kind[i]), t.object_size[i], t.object_colour[i], i)
                 for i in visible]
        if rng.random() < cond.traffic:   # a vehicle ahead in our lane, or oncoming on the left
            ahead = rng.random() < 0.7
            items.append((rng.uniform(7, 22), rng.uniform(-0.6, 0.6) if ahead else rng.uniform(-4.5, -3.0),
                          CAR, rng.uniform(4.2, 9.0), np.array([180, 180, 185], np.float32)
                          * rng.uniform(0.3, 1.2), -1))
        for fwd, lat, kind, size, colour, ident in sorted(items, key=lambda it: -it[0]):
            self._draw_object(image, depth, fwd, lat, kind, size, colour, ident, horizon, cond, light)

    def _draw_object(self, image, depth, fwd, lat, kind, size, colour, ident, horizon, cond, light) -> None:
        f, cam_h = self.focal, cond.camera_height_m
        cx = self.width / 2 + f * lat / fwd
        ground_row = horizon + f * cam_h / fwd
        scale = f / fwd
        if kind == TREE:
            half_w, top = size * scale, ground_row - (size * 2.2 + 2.5) * scale
        elif kind == LAMP:
            half_w, top = 0.6 * scale, ground_row - size * scale
        else:
            tall = size > 6.0  # buses and trucks
            half_w = (1.25 if tall else 0.95) * scale
            top = ground_row - (3.0 if tall else 1.45) * scale
        c0, c1 = int(max(0, math.floor(cx - half_w))), int(min(self.width, math.ceil(cx + half_w)))
        r0, r1 = int(max(0, math.floor(top))), int(min(self.height, math.ceil(ground_row)))
        if c0 >= c1 or r0 >= r1 or not (fwd < depth[r0:r1, c0:c1]).any():  # off-screen or hidden
            return
        yy = np.arange(r0, r1, dtype=np.float32)[:, None]
        xx = np.arange(c0, c1, dtype=np.float32)[None, :]
        nx = (xx + 0.5 - cx) / max(half_w, 1e-3)                 # (1, c): -1..1 across the object
        ny = (ground_row - yy - 0.5) / max(ground_row - top, 1e-3)  # (r, 1): 0 at the ground, 1 at the top
        emissive = None  # (mask, colour) of parts that glow after dark
        if kind == TREE:
            trunk = (np.abs(nx) < 0.09) & (ny < 0.55)
            wobble = self._noise[yy.astype(np.int64) & 255, (xx.astype(np.int64) + ident * 31) & 255]
            canopy = nx ** 2 + ((ny - 0.62) / 0.38) ** 2 < 1.0 + 0.15 * wobble
            if cond.season == "winter":  # bare branches
                canopy &= (wobble > 0.9) | (np.abs(nx) < 0.05 + 0.5 * np.clip(ny - 0.5, 0, 1) * (wobble > 0.3))
                leaf = np.array([70, 60, 50], np.float32)
            else:
                leaf = np.clip(colour * np.array(_CANOPY_TINT[cond.season], np.float32), 0, 255)
            mask = trunk | canopy
            pix = np.where(canopy[..., None], leaf * (1 + 0.12 * wobble[..., None]), np.array([80, 60, 45], np.float32))
        elif kind == LAMP:
            head = (ny > 0.93) & (np.abs(nx) < 0.9)
            mask = (np.abs(nx) < 0.12) | head
            pix = np.where(head[..., None], np.array([200, 200, 190], np.float32), colour)
            emissive = (head, np.array([255, 230, 170], np.float32))
        else:
            mask = ny < 0.88
            window = (ny > 0.52) & (ny < 0.82) & (np.abs(nx) < 0.8)
            wheels = (ny < 0.16) & (np.abs(nx) > 0.55)
            pix = np.where(window[..., None], np.array([40, 50, 60], np.float32), colour)
            pix = np.where(wheels[..., None], np.array([20, 20, 20], np.float32), pix)
            emissive = ((ny > 0.3) & (ny < 0.42) & (np.abs(nx) > 0.7), np.array([255, 40, 30], np.float32))
        region = depth[r0:r1, c0:c1]
        mask = np.broadcast_to(mask, region.shape) & (fwd < region)
        shaded = np.broadcast_to(pix * light, (*region.shape, 3))
        if emissive is not None and cond.time != "day":
            shaded = np.where(emissive[0][..., None], emissive[1], shaded)
        image[r0:r1, c0:c1][mask] = shaded[mask]
        region[mask] = fwd

    # ------------------------------------------------------------------ finishing

    def _finish(self, image, depth, cond: Condition, rng) -> np.ndarray:
        visibility = {"clear": 900.0, "overcast": 450.0, "rain": 180.0, "fog": 55.0}[cond.weather]
        fog_colour = np.array([190, 192, 196] if cond.time == "day" else [110, 100, 105] if cond.time == "dusk"
                              else [25, 25, 32], np.float32)
        haze = 1.0 - np.exp(-np.minimum(depth, 5000.0) / np.float32(visibility))
        haze[np.isinf(depth)] *= 0.6 if cond.weather == "fog" else 0.0
        image += (fog_colour - image) * haze[..., None]
        if cond.season == "autumn":
            image *= np.array([1.05, 1.0, 0.9], np.float32)
        elif cond.season == "winter":
            image *= np.array([0.95, 0.98, 1.06], np.float32)
        if cond.weather == "rain":
            image = cv2.GaussianBlur(image, (0, 0), 0.8)
            streaks = np.zeros(image.shape[:2], np.float32)
            n = self.width * self.height // 900
            p = rng.uniform([0, 0], [self.width, self.height], (n, 2)).astype(np.int32)
            length = int(max(4, self.height // 20))
            for x0, y0 in p:
                cv2.line(streaks, (int(x0), int(y0)), (int(x0) - length // 4, int(y0) + length), 1.0, 1)
            image += streaks[..., None] * 45.0
        dy, dx = rng.integers(0, 32, 2)
        image += self._sensor_noise[dy:dy + self.height, dx:dx + self.width]
        return np.clip(image, 0, 255).astype(np.uint8)


def _hash(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """A deterministic integer hash of three integer arrays (for per-window variation)."""
    h = (a.astype(np.int32) * 73856093) ^ (b.astype(np.int32) * 19349663) ^ (c.astype(np.int32) * 83492791)
    return (h & 0x7FFFFFFF) % 1_000_003


def _periodic_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Zero-mean, unit-variance smooth noise that tiles seamlessly (Gaussian low-pass in Fourier space)."""
    spectrum = np.fft.fft2(rng.normal(0, 1, shape))
    fy, fx = np.fft.fftfreq(shape[0])[:, None], np.fft.fftfreq(shape[1])[None, :]
    smooth = np.fft.ifft2(spectrum * np.exp(-2 * (math.pi * sigma) ** 2 * (fx ** 2 + fy ** 2))).real
    return ((smooth - smooth.mean()) / smooth.std()).astype(np.float32)
