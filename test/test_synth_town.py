"""The synthetic town: determinism, CSVs that match the rendered poses, positives for every query,
rendering conditions, and the vpr-synth CLI."""
import filecmp
from pathlib import Path

import numpy as np
import pytest

from vpr_rerank_ros.cli import synth_main
from vpr_rerank_ros.datasets.msls import load_city, positives
from vpr_rerank_ros.datasets.street_render import Condition, StreetRenderer
from vpr_rerank_ros.datasets.synth_town import (SynthConfig, _covering_routes, contact_sheet, generate, plan_city)
from vpr_rerank_ros.datasets.town import TownConfig, generate_town
from vpr_rerank_ros.geo import meridian_convergence_deg
from vpr_rerank_ros.images import decode_compressed, encode_jpeg, read_rgb

TINY = SynthConfig(town=TownConfig(blocks_x=2, blocks_y=2), width=96, height=72, frame_spacing_m=8.0,
                   query_sequences=3, query_frames=6)


@pytest.fixture(scope="session")
def tiny_town(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    plans = generate(root, cities=2, seed=7, config=TINY)
    return root, plans


def all_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_same_seed_gives_byte_identical_output(tiny_town, tmp_path):
    root, _ = tiny_town
    again = tmp_path / "again"
    generate(again, cities=2, seed=7, config=TINY, workers=2)   # more workers, same bytes
    files = all_files(root)
    assert files == all_files(again) and len(files) > 100
    match, mismatch, errors = filecmp.cmpfiles(root, again, [str(f) for f in files], shallow=False)
    assert not mismatch and not errors


def test_other_seed_gives_another_town(tiny_town, tmp_path):
    root, plans = tiny_town
    other = plan_city(TINY, 8, 0)
    assert not np.allclose(other.town.nodes, plans[0].town.nodes)


def test_counts_and_layout(tiny_town):
    root, plans = tiny_town
    for plan in plans:
        query, database = load_city(root, plan.name)
        assert (len(query), len(database)) == (len(plan.query), len(plan.database))
        assert len(query) == TINY.query_sequences * TINY.query_frames
        assert len(database) > 50
        assert all(p.exists() for p in database.image_paths()[:5] + query.image_paths()[:5])
        assert len(np.unique(query.sequence_key)) == TINY.query_sequences
    assert (root / "synth_town.json").exists()
    assert str(plans[1].zone) == "21S"   # the second site is in the southern hemisphere


def test_csv_poses_match_the_rendered_poses(tiny_town):
    root, plans = tiny_town
    plan = plans[0]
    query, database = load_city(root, plan.name)
    shots = {s.key: s for s in plan.database + plan.query}
    for side in (query, database):
        x = np.array([shots[k].x for k in side.keys])
        y = np.array([shots[k].y for k in side.keys])
        east, north = plan.to_utm(x, y)
        assert np.allclose(side.easting, east, atol=1e-6) and np.allclose(side.northing, north, atol=1e-6)
        grid_heading = (side.heading - meridian_convergence_deg(side.lat, side.lon, plan.zone)) % 360
        expected = np.array([shots[k].heading for k in side.keys])
        assert np.allclose((grid_heading - expected + 180) % 360 - 180, 0, atol=1e-6)
    # An image on disk is what the renderer shows from the pose in the CSV.
    renderer = StreetRenderer(plan.town, TINY.width, TINY.height, TINY.hfov_deg)
    i = 3
    shot = shots[query.keys[i]]
    grid_heading = (query.heading[i] - meridian_convergence_deg(query.lat[i], query.lon[i], plan.zone)) % 360
    on_disk = read_rgb(query.image_path(i)).astype(float)

    def rendered(dx: float) -> np.ndarray:
        rgb = renderer.render(query.easting[i] - plan.origin_en[0] + dx, query.northing[i] - plan.origin_en[1],
                              float(grid_heading), shot.condition, seed=shot.seed, pitch_deg=shot.pitch)
        return decode_compressed(encode_jpeg(rgb, TINY.jpeg_quality)).astype(float)

    assert np.abs(on_disk - rendered(0.0)).mean() < 0.5
    assert np.abs(on_disk - rendered(2.0)).mean() > 5.0   # a pose 2 m off is clearly another image


def test_every_query_has_database_positives_within_25m(tiny_town):
    root, plans = tiny_town
    for plan in plans:
        query, database = load_city(root, plan.name)
        pos = positives(query, database, 25.0)
        assert min(len(p) for p in pos) >= 1
        # The reader's positives agree with a brute-force count.
        dist = np.hypot(query.easting[:, None] - database.easting[None], query.northing[:, None] - database.northing[None])
        assert [len(p) for p in pos] == list((dist <= 25.0).sum(axis=1))


def test_database_drives_cover_every_street_both_ways():
    town = generate_town(TINY.town, 3)
    routes = _covering_routes(town, np.random.default_rng(0), 4)
    driven = {(a, b) for r in routes for a, b in zip(r, r[1:])}
    streets = {(int(a), int(b)) for a, b in town.edges}
    assert driven == streets | {(b, a) for a, b in streets}
    assert all(len(r) - 1 <= 4 for r in routes)


def test_cameras_drive_in_the_right_hand_lane(tiny_town):
    _, plans = tiny_town
    plan = plans[0]
    a, b = plan.town.nodes[plan.town.edges[:, 0]], plan.town.nodes[plan.town.edges[:, 1]]
    for shot in plan.database + plan.query:
        p = np.array([shot.x, shot.y])
        t = np.clip(((p - a) * (b - a)).sum(1) / ((b - a) ** 2).sum(1), 0, 1)
        nearest = int(np.argmin(np.hypot(*(a + (b - a) * t[:, None] - p).T)))
        along = b[nearest] - a[nearest]
        yaw = np.radians(90 - shot.heading)
        if abs(np.dot(along / np.linalg.norm(along), [np.cos(yaw), np.sin(yaw)])) < 0.9:
            continue  # turning at an intersection
        direction = np.sign(np.dot(along, [np.cos(yaw), np.sin(yaw)]))
        d, r = direction * along / np.linalg.norm(along), p - a[nearest]
        offset = d[0] * r[1] - d[1] * r[0]
        assert -3.0 < offset < -0.9, (shot.key, offset)   # negative cross product: right of travel


def test_town_has_repeated_facades():
    town = generate_town(TownConfig(), 0)
    counts = np.bincount(town.facade_style, minlength=TownConfig().n_styles)
    repeated = counts[:TownConfig().n_repeated_styles]
    assert repeated.min() >= 5              # the same "chain" facade stands in several places
    assert (np.hypot(*(town.facade_p1 - town.facade_p0).T) > 1.0).all()


def test_conditions_change_the_image():
    town = generate_town(TINY.town, 1)
    renderer = StreetRenderer(town, 96, 72)
    a, b = town.nodes[town.edges[0]]
    heading = float((90 - np.degrees(np.arctan2(*(b - a)[::-1]))) % 360)
    pose = (*(a + (b - a) * 0.4), heading)
    day = renderer.render(*pose, Condition(), seed=1)
    assert np.array_equal(day, renderer.render(*pose, Condition(), seed=1))
    night = renderer.render(*pose, Condition(time="night"), seed=1)
    fog = renderer.render(*pose, Condition(weather="fog"), seed=1)
    winter = renderer.render(*pose, Condition(season="winter"), seed=1)
    assert night.mean() < 0.6 * day.mean()
    assert fog.std() < day.std()
    assert np.abs(winter.astype(float) - day).mean() > 3
    with pytest.raises(ValueError, match="weather"):
        Condition(weather="snowstorm")
    with pytest.raises(ValueError, match="size"):
        StreetRenderer(town, 8, 8)


def test_contact_sheet(tiny_town):
    _, plans = tiny_town
    sheet = contact_sheet(plans[0], TINY, pairs=3, tile_width=64)
    assert sheet.shape == (3 * 48, 128, 3) and sheet.dtype == np.uint8


def test_cli_writes_a_town_and_a_bag(tmp_path, capsys):
    args = ["--cities", "1", "--seed", "3", "--size", "64x48", "--blocks", "2x2", "--spacing", "10",
            "--query-sequences", "2", "--query-frames", "4"]
    assert synth_main(["--out", str(tmp_path / "msls"), "--bag", str(tmp_path / "drive"), "--bag-length", "40",
                       "--bag-storage", "sqlite3", *args]) == 0
    out = capsys.readouterr().out
    assert "synth0" in out and "bag:" in out
    query, database = load_city(tmp_path / "msls", "synth0")
    assert len(query) == 8 and len(database) > 0
    assert list((tmp_path / "drive").glob("*.db3"))
    with pytest.raises(SystemExit):
        synth_main(["--cities", "1"])            # neither --out nor --bag
    with pytest.raises(SystemExit):
        synth_main(["--out", str(tmp_path / "x"), "--size", "640by480"])
    assert synth_main(["--bag", str(tmp_path / "drive"), *args]) == 1   # exists already: a user error
    assert "already exists" in capsys.readouterr().err
