"""Geodesy (UTM, ENU, headings) and field-of-view overlap, closed form against finely segmented shapely polygons."""
import math

import numpy as np
import pyproj
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vpr_rerank_ros.geo import (EnuFrame, OverlapGraph, UtmZone, _fov_overlap_shapely, fov_overlap, fov_sector,
                                heading_difference, heading_to_yaw, latlon_to_utm, meridian_convergence_deg,
                                quaternion_yaw, utm_to_latlon, utm_zone_for, yaw_to_heading)

GEOD = pyproj.Geod(ellps="WGS84")


# ------------------------------------------------------------------ UTM


@pytest.mark.parametrize("lat, lon, zone", [
    (55.7047, 13.1910, "33N"),     # Lund
    (-34.6037, -58.3816, "21S"),   # Buenos Aires
    (-33.8688, 151.2093, "56S"),   # Sydney
    (0.0, 5.999, "31N"),
    (0.0, 6.001, "32N"),           # across a zone border
    (60.39, 5.32, "32N"),          # Bergen: the Norway exception
    (78.22, 15.65, "33N"),         # Svalbard exception
    (10.0, 180.0, "60N"),
    (10.0, -180.0, "1N"),
])
def test_utm_zone_and_round_trip(lat, lon, zone):
    assert str(utm_zone_for(lat, lon)) == zone
    e, n, z = latlon_to_utm(lat, lon)
    assert str(z) == zone
    lat2, lon2 = utm_to_latlon(e, n, z)
    assert lat2 == pytest.approx(lat, abs=1e-9)
    assert (lon2 - lon + 180) % 360 - 180 == pytest.approx(0, abs=1e-9)


def test_utm_known_values():
    # On the equator at a central meridian: false easting 500 km; southern hemisphere: false northing 10,000 km.
    e, n, _ = latlon_to_utm(0.0, 3.0, UtmZone(31))
    assert (float(e), float(n)) == pytest.approx((500000.0, 0.0), abs=1e-6)
    e, n, z = latlon_to_utm(-1e-6, 3.0)
    assert z == UtmZone(31, south=True) and float(n) == pytest.approx(10_000_000.0, abs=0.2)


def test_utm_points_across_border_share_one_metric_zone():
    lat = np.array([47.0, 47.0])
    lon = np.array([5.99, 6.01])  # either side of the 31/32 border
    e, n, zone = latlon_to_utm(lat, lon)
    assert zone.number in (31, 32)
    planar = math.hypot(e[1] - e[0], n[1] - n[0])
    geodesic = GEOD.inv(lon[0], lat[0], lon[1], lat[1])[2]
    assert planar == pytest.approx(geodesic, rel=2e-3)


def test_utm_zone_parse_and_errors():
    assert UtmZone.parse("19s") == UtmZone(19, True) and UtmZone(19, True).epsg == 32719
    for bad in ("", "33", "N33", "61N", "0N"):
        with pytest.raises(ValueError):
            UtmZone.parse(bad)
    with pytest.raises(ValueError, match="NaN"):
        latlon_to_utm([55.0, np.nan], [13.0, 13.0])
    with pytest.raises(ValueError, match="latitude"):
        latlon_to_utm(91.0, 0.0)
    with pytest.raises(ValueError, match="NaN"):
        utm_to_latlon(np.nan, 0.0, UtmZone(33))


def test_meridian_convergence_sign():
    zone = UtmZone(33)
    assert meridian_convergence_deg(55.7, 15.0, zone) == pytest.approx(0.0, abs=1e-9)
    assert meridian_convergence_deg(55.7, 17.5, zone) > 1.5   # east of the central meridian
    assert meridian_convergence_deg(55.7, 12.5, zone) < -1.5


# ------------------------------------------------------------------ ENU and headings


def test_enu_frame():
    frame = EnuFrame(55.7047, 13.1910, 20.0)
    e, n, u = frame.to_enu(55.7047, 13.1910, 20.0)
    assert np.allclose([e, n, u], 0.0, atol=1e-6)
    lon, lat, _ = GEOD.fwd(13.1910, 55.7047, 0.0, 100.0)  # 100 m due north
    e, n, u = frame.to_enu(lat, lon, 20.0)
    assert (float(e), float(n)) == pytest.approx((0.0, 100.0), abs=1e-3) and abs(u) < 0.01
    lon, lat, _ = GEOD.fwd(13.1910, 55.7047, 90.0, 250.0)  # 250 m due east
    e, n, u = frame.to_enu(lat, lon, 20.0)
    assert float(e) == pytest.approx(250.0, abs=1e-2) and abs(n) < 0.01
    lat2, lon2, alt2 = frame.to_latlon(e, n, u)
    assert (float(lat2), float(lon2), float(alt2)) == pytest.approx((lat, lon, 20.0), abs=1e-9)


def test_heading_yaw_conventions():
    headings = np.array([0.0, 90.0, 180.0, 270.0, 45.0, 359.0])
    yaws = heading_to_yaw(headings)
    assert np.allclose(yaws[:5], [math.pi / 2, 0.0, -math.pi / 2, math.pi, math.pi / 4])
    assert np.all((yaws > -math.pi) & (yaws <= math.pi))
    assert np.allclose(yaw_to_heading(yaws), headings)
    assert heading_difference(350.0, 10.0) == pytest.approx(20.0)
    assert heading_difference(0.0, 180.0) == pytest.approx(180.0)


def test_quaternion_yaw_is_the_rotation_about_z_whatever_the_tilt():
    for yaw in (0.0, 0.7, -2.0, math.pi):
        q = (0.0, 0.0, math.sin(yaw / 2), math.cos(yaw / 2))
        assert math.cos(quaternion_yaw(*q) - yaw) == pytest.approx(1.0)
        assert quaternion_yaw(*(2.0 * c for c in q)) == pytest.approx(quaternion_yaw(*q))     # not normalised
    # yaw 0.5 then pitch 0.1 (intrinsic z-y'): the yaw survives a vehicle's pitch
    cy, sy, cp, sp = math.cos(0.25), math.sin(0.25), math.cos(0.05), math.sin(0.05)
    assert quaternion_yaw(-sy * sp, cy * sp, sy * cp, cy * cp) == pytest.approx(0.5)
    assert yaw_to_heading(quaternion_yaw(0.0, 0.0, math.sin(math.pi / 6), math.cos(math.pi / 6))) == pytest.approx(30.0)
    for bad in ((0.0, 0.0, 0.0, 0.0), (float("nan"), 0.0, 0.0, 1.0)):
        with pytest.raises(ValueError, match="is not a rotation"):
            quaternion_yaw(*bad)


# ------------------------------------------------------------------ FoV overlap


def random_pairs(n, seed=0, max_dist=110.0):
    rng = np.random.default_rng(seed)
    a = np.c_[rng.uniform(-1000, 1000, (n, 2)) + [500000.0, 6170000.0], rng.uniform(0, 360, n)]
    d, ang = rng.uniform(0, max_dist, n), rng.uniform(0, 2 * np.pi, n)
    b = np.c_[a[:, :2] + np.c_[d * np.cos(ang), d * np.sin(ang)], rng.uniform(0, 360, n)]
    return a, b


def shapely_tolerance(fov_deg, arc_segments):
    """Bound on shapely's own error: each polygon misses its sector's arc caps (area `missed`), so the ratio of
    polygon areas is within 2·missed/polygon of the true ratio; plus float rounding."""
    half = math.radians(fov_deg) / 2
    polygon = arc_segments / 2 * math.sin(2 * half / arc_segments)
    return 2 * (half - polygon) / polygon + 1e-9


def shapely_reference(a, b, fov_deg=90.0, arc_segments=4096):
    """Finely segmented shapely overlap, in coordinates relative to a (shapely rounds UTM coordinates)."""
    a, b = np.broadcast_arrays(np.asarray(a, np.float64), np.asarray(b, np.float64))
    origin = np.concatenate([a[..., :2], np.zeros(a.shape[:-1] + (1,))], axis=-1)
    return _fov_overlap_shapely(a - origin, b - origin, 50.0, fov_deg, arc_segments)


@pytest.mark.parametrize("fov_deg", [30.0, 90.0, 180.0])
def test_closed_form_matches_finely_segmented_shapely(fov_deg):
    a, b = random_pairs(400, seed=int(fov_deg))
    # Hard cases among them: identical poses, one apex (headings a multiple of the half angle apart: collinear
    # edges), same heading (parallel edges), opposite headings.
    b[:20] = a[:20]
    b[20:60, :2] = a[20:60, :2]
    b[20:60, 2] = a[20:60, 2] + np.arange(-20, 20) * fov_deg / 2
    b[60:80, 2] = a[60:80, 2]
    b[80:100, 2] = a[80:100, 2] + 180.0
    got = fov_overlap(a, b, fov_deg=fov_deg)
    assert np.abs(got - shapely_reference(a, b, fov_deg)).max() <= shapely_tolerance(fov_deg, 4096) < 1e-6
    assert np.abs(got - fov_overlap(b, a, fov_deg=fov_deg)).max() <= 1e-12
    assert got.min() >= 0.0 and got.max() <= 1.0 and 0.1 < (got > 0).mean() < 0.9
    assert np.abs(got[:20] - 1.0).max() <= 1e-12


@pytest.mark.parametrize("a, b, expected", [
    ([0, 0, 33], [0, 0, 33], 1.0),                       # identical
    ([0, 0, 33], [0, 0, 78], 0.5),                       # one apex, headings 45° apart
    ([0, 0, 33], [0, 0, 123], 0.0),                      # one apex, edges collinear: touching
    ([0, 0, 33], [0, 0, 213], 0.0),                      # one apex, opposite
    ([0, 0, 90], [100, 0, 270], 0.0),                    # arcs touching at one point, 2r apart
    ([0, 0, 90], [100.001, 0, 270], 0.0),                # just out of reach
    ([0, 0, 90], [50, -20, 45], 0.0),                    # B's edge tangent to A's arc from outside
    ([0, 0, 90], [50, -20, 315], None),                  # B's edge tangent to A's arc, B over A
    ([0, 0, 0], [0, 60, 180], None),                     # facing each other
    ([0, 0, 0], [0, 30, 0], None),                       # B ahead, same heading: parallel edges
    ([0, 0, 0], [30 * math.sin(math.pi / 4), 30 * math.cos(math.pi / 4), 0], None),   # B's apex on A's edge
    ([0, 0, 0], [0, -10, 0], None),                      # A's apex inside B
    ([0, 0, 0], [0, 10, 180], None),                     # apexes inside each other, opposite headings
    ([0, 0, 0], [1e-9, 0, 0], 1.0),                      # apexes a nanometre apart
    ([0, 0, 0], [0, 99.999, 180], None),                 # lens of two arcs almost touching
])
@pytest.mark.parametrize("utm", [False, True])
def test_closed_form_hard_cases(a, b, expected, utm):
    offset = np.array([500000.0, 6170000.0, 0.0]) if utm else np.zeros(3)
    a, b = np.asarray(a, np.float64) + offset, np.asarray(b, np.float64) + offset
    got, reverse = float(fov_overlap(a, b)), float(fov_overlap(b, a))
    # At an exact tangency a crossing point is only known to about sqrt(float64 epsilon).
    assert got == pytest.approx(reverse, abs=1e-7) and 0.0 <= got <= 1.0
    assert got == pytest.approx(float(shapely_reference(a, b)), abs=shapely_tolerance(90.0, 4096))
    if expected is not None:
        assert got == pytest.approx(expected, abs=1e-6)


@settings(max_examples=150, deadline=None)
@given(dist=st.one_of(st.floats(0.0, 110.0), st.sampled_from([0.0, 50.0, 100.0, 70.71067811865476])),
       bearing=st.one_of(st.floats(0.0, 360.0), st.sampled_from([0.0, 45.0, 90.0, 180.0])),
       heading_a=st.one_of(st.floats(0.0, 360.0), st.sampled_from([0.0, 45.0, 90.0])),
       turn=st.one_of(st.floats(-360.0, 360.0), st.sampled_from([0.0, 15.0, 45.0, 90.0, 180.0])),
       fov_deg=st.one_of(st.floats(1.0, 180.0), st.sampled_from([30.0, 90.0, 180.0])))
def test_closed_form_matches_shapely_on_any_pair(dist, bearing, heading_a, turn, fov_deg):
    a = np.array([0.0, 0.0, heading_a])
    b = np.array([dist * math.sin(math.radians(bearing)), dist * math.cos(math.radians(bearing)), heading_a + turn])
    got = float(fov_overlap(a, b, fov_deg=fov_deg))
    assert 0.0 <= got <= 1.0 and got == pytest.approx(float(fov_overlap(b, a, fov_deg=fov_deg)), abs=1e-7)
    reference = _fov_overlap_shapely(a, b, 50.0, fov_deg, 2048)
    assert got == pytest.approx(float(reference), abs=shapely_tolerance(fov_deg, 2048))


@pytest.mark.parametrize("exact", [False, True])
def test_overlap_special_cases(exact):
    p = [500000.0, 6170000.0, 33.0]
    assert fov_overlap(p, p, exact=exact) == pytest.approx(1.0, abs=1e-6)
    assert fov_overlap(p, [p[0] + 150.0, p[1], 33.0], exact=exact) == 0.0
    # Same apex: heading 45° apart overlaps by half, 90° apart only along an edge, opposite not at all.
    assert fov_overlap(p, [p[0], p[1], 78.0], exact=exact) == pytest.approx(0.5, abs=1e-6)
    assert fov_overlap(p, [p[0], p[1], 123.0], exact=exact) == pytest.approx(0.0, abs=1e-6)
    assert fov_overlap(p, [p[0], p[1], 213.0], exact=exact) == pytest.approx(0.0, abs=1e-6)
    # Looking at each other from 60 m apart: a lens-shaped overlap, symmetric.
    q = [p[0], p[1] + 60.0, 213.0]
    ab, ba = fov_overlap(p, q, exact=exact), fov_overlap(q, p, exact=exact)
    assert 0.05 < ab < 0.5 and ab == pytest.approx(ba, abs=1e-6)


def test_overlap_configurable_sector():
    p = [0.0, 0.0, 0.0]
    # A 180° sector holds a 90° sector with the same axis: overlap = half of the larger sector.
    assert fov_overlap(p, [0.0, 0.0, 45.0], fov_deg=180.0) == pytest.approx(0.75, abs=1e-12)
    assert fov_overlap(p, [0.0, 80.0, 0.0], radius=50.0) == 0.0
    larger = fov_overlap(p, [0.0, 80.0, 0.0], radius=100.0)
    assert larger > 0.03
    assert larger == pytest.approx(fov_overlap(p, [0.0, 80.0, 0.0], radius=100.0, exact=True), abs=1e-5)
    # The overlap depends on lengths relative to r only.
    assert larger == pytest.approx(fov_overlap(p, [0.0, 40.0, 0.0], radius=50.0), abs=1e-12)
    assert fov_sector(0, 0, 0).area == pytest.approx(math.pi * 50**2 / 4, rel=1e-4)


def test_overlap_broadcasts_to_matrices():
    rng = np.random.default_rng(3)
    k = np.c_[rng.uniform(0, 100, (7, 2)), rng.uniform(0, 360, 7)]
    m = fov_overlap(k[:, None, :], k[None, :3, :])
    assert m.shape == (7, 3)
    assert np.allclose(m, fov_overlap(np.repeat(k[:, None], 3, 1), np.repeat(k[None, :3], 7, 0)), atol=0)
    assert np.allclose(m, fov_overlap(k[:, None, :], k[None, :3, :], exact=True), atol=1e-5)
    assert np.allclose(np.diag(m[:3]), 1.0)
    assert fov_overlap(k[:0], k[:0]).shape == (0,) and fov_overlap(k[0], k[1]).shape == ()


def test_overlap_torch_input_returns_tensor_and_matches_numpy():
    a, b = random_pairs(500, seed=5)
    expected = fov_overlap(a, b)
    out = fov_overlap(torch.from_numpy(a), torch.from_numpy(b))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float64
    assert np.array_equal(out.numpy(), expected)
    # float32 tensors hold local (not UTM) coordinates well enough; their result is float32.
    local_a, local_b = a.copy(), b.copy()
    local_a[:, :2] -= a[:, :2]
    local_b[:, :2] -= a[:, :2]
    out32 = fov_overlap(torch.tensor(local_a, dtype=torch.float32), torch.tensor(local_b, dtype=torch.float32))
    assert out32.dtype == torch.float32 and np.allclose(out32.numpy(), expected, atol=1e-5)
    assert fov_overlap(torch.tensor(local_a, dtype=torch.float32), local_b).dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_overlap_cuda_matches_cpu():
    a, b = random_pairs(20_000, seed=6)
    cpu = fov_overlap(a, b)
    gpu = fov_overlap(torch.from_numpy(a).cuda(), torch.from_numpy(b).cuda())
    assert gpu.is_cuda and gpu.dtype == torch.float64
    assert np.abs(gpu.cpu().numpy() - cpu).max() <= 1e-9
    rows = torch.from_numpy(a[:64, None]).cuda().float()
    assert fov_overlap(rows, rows.transpose(0, 1)).dtype == torch.float32
    with pytest.raises(ValueError, match="different devices"):
        fov_overlap(torch.from_numpy(a).cuda(), torch.from_numpy(b))


def test_overlap_rejects_bad_input():
    with pytest.raises(ValueError, match="NaN"):
        fov_overlap([0.0, np.nan, 0.0], [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="NaN"):
        fov_overlap([0.0, 0.0, 0.0], torch.tensor([0.0, 0.0, np.inf]))
    with pytest.raises(ValueError, match="NaN"):
        fov_overlap([0.0, np.inf, 0.0], [0.0, 0.0, 0.0], exact=True)
    with pytest.raises(ValueError, match="last dimension of 3"):
        fov_overlap([0.0, 0.0], [0.0, 0.0])
    with pytest.raises(ValueError, match="convex"):
        fov_overlap([0, 0, 0], [0, 0, 0], fov_deg=200.0)
    with pytest.raises(ValueError, match="radius"):
        fov_overlap([0, 0, 0], [0, 0, 0], radius=0.0)
    with pytest.raises(RuntimeError, match="broadcast"):
        fov_overlap(np.zeros((3, 3)), np.zeros((2, 3)))


# ------------------------------------------------------------------ overlap graph


def test_overlap_graph_matches_dense_matrix():
    rng = np.random.default_rng(11)
    poses = np.c_[rng.uniform(0, 400, (300, 2)) + [400000.0, 5000000.0], rng.uniform(0, 360, 300)]
    graph = OverlapGraph.build(poses)
    dense = fov_overlap(poses[:, None, :], poses[None, :, :])
    np.fill_diagonal(dense, 1.0)
    got = graph.matrix.toarray()
    assert np.allclose(got, dense, atol=1e-6) and np.allclose(dense, dense.T, atol=1e-6)
    assert (got != 0).sum() == (dense > 0).sum()            # exactly the overlapping pairs are stored
    assert (graph.matrix != graph.matrix.T).nnz == 0
    rows, cols = np.array([5, 17, -1, 299]), np.array([0, -1, 17, 42])
    block = graph.lookup(rows, cols)
    assert block.shape == (4, 4)
    assert np.allclose(block[[0, 1, 3]][:, [0, 2, 3]], dense[np.ix_([5, 17, 299], [0, 17, 42])], atol=1e-6)
    assert (block[2] == 0).all() and (block[:, 1] == 0).all()
    # Any rows and columns, repeated ones and padding included, give the dense matrix's entries.
    rng = np.random.default_rng(1)
    padded = np.vstack([np.hstack([dense, np.zeros((300, 1))]), np.zeros((1, 301))])  # index -1: the zero row/col
    for size in (0, 1, 40, 400):
        rows, cols = rng.integers(-1, 300, size), rng.integers(-1, 300, 2 * size)
        assert np.allclose(graph.lookup(rows, cols), padded[np.ix_(rows, cols)], atol=1e-6)
    # A batch in one call: each query's own K x K block, and (B, R) x (B, C) blocks.
    batch = rng.integers(-1, 300, (5, 30))
    assert np.allclose(graph.lookup_batch(batch), np.stack([padded[np.ix_(r, r)] for r in batch]), atol=1e-6)
    cols = rng.integers(-1, 300, (5, 7))
    assert np.allclose(graph.lookup_batch(batch, cols),
                       np.stack([padded[np.ix_(r, c)] for r, c in zip(batch, cols)]), atol=1e-6)
    with pytest.raises(IndexError):
        graph.lookup([300], [0])
    with pytest.raises(ValueError, match=r"\(B, R\)"):
        graph.lookup_batch(batch[0])


def test_chunked_graph_build_equals_all_pairs():
    """A few thousand poses along streets, built 128 rows at a time: the same matrix as all pairs at once."""
    rng = np.random.default_rng(12)
    street = rng.integers(0, 8, 3000)
    along, across = rng.uniform(0, 1500, 3000), 60.0 * street + rng.normal(0, 2, 3000)
    poses = np.c_[np.where(street % 2, along, across) + 300000.0, np.where(street % 2, across, along) + 5000000.0,
                  rng.uniform(0, 360, 3000)]
    poses[1::7] = poses[::7][:len(poses[1::7])]             # some duplicated poses
    graph = OverlapGraph.build(poses, chunk_rows=128)
    assert graph.matrix.indices.dtype == np.int32 and graph.matrix.data.dtype == np.float32
    dense = fov_overlap(poses[:, None, :], poses[None, :, :]).astype(np.float32)
    np.fill_diagonal(dense, 1.0)
    assert np.array_equal(graph.matrix.toarray(), np.where(dense > 0, dense, 0))
    assert graph.matrix.nnz == (dense > 0).sum() > 20 * len(poses)
    assert OverlapGraph.build(np.zeros((0, 3))).size == 0


def test_overlap_graph_save_load(tmp_path):
    poses = np.array([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [500.0, 0.0, 0.0]])
    graph = OverlapGraph.build(poses, radius=40.0, fov_deg=60.0)
    graph.save(tmp_path / "g.npz")
    loaded = OverlapGraph.load(tmp_path / "g.npz")
    assert (loaded.radius, loaded.fov_deg) == (40.0, 60.0)
    assert np.array_equal(loaded.matrix.toarray(), graph.matrix.toarray())
    assert loaded.matrix[0, 2] == 0 and loaded.matrix[0, 1] > 0.5


def test_overlap_graph_on_real_msls_geometry(shared_data):
    """Austin's real database positions (first 1500 images): the sparse graph agrees with direct overlaps."""
    z = np.load(shared_data / "msls_geometry" / "msls_amman_austin_melbourne_utm_heading_derived.npz")
    poses = np.c_[z["austin_db_utm_en"][:1500], z["austin_db_heading_deg_derived"][:1500]]
    graph = OverlapGraph.build(poses)
    pairs = np.argwhere(np.triu(graph.matrix.toarray(), 1) > 0)
    assert len(pairs) > 1500  # consecutive frames of a drive overlap
    sample = pairs[np.random.default_rng(0).choice(len(pairs), 300, replace=False)]
    direct = fov_overlap(poses[sample[:, 0]], poses[sample[:, 1]], exact=True)
    assert np.abs(graph.matrix.toarray()[sample[:, 0], sample[:, 1]] - direct).max() <= 0.01


def test_zones_can_be_given_as_text():
    """latlon_to_utm(lat, lon, "33N") and utm_to_latlon(e, n, "33N") as the README writes them."""
    e, n, zone = latlon_to_utm(55.70, 13.19, "33N")
    assert zone == UtmZone(33) and np.allclose(utm_to_latlon(e, n, "33N"), (55.70, 13.19))
    with pytest.raises(ValueError):
        latlon_to_utm(55.70, 13.19, "99X")
