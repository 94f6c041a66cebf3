"""Map building: geotagged sources (EXIF folder, CSV, MSLS), the offline default on a synthetic town and on
the real Lund photos, the model-identity check, and `vpr-map build/query`."""
import csv

import numpy as np
import pytest
from PIL import ExifTags, Image
from PIL.TiffImagePlugin import IFDRational

from vpr_rerank_ros.cli import map_main
from vpr_rerank_ros.datasets import geotagged
from vpr_rerank_ros.datasets.msls import load_city, positives
from vpr_rerank_ros.descriptors.model import save_model
from vpr_rerank_ros.geo import latlon_to_utm, meridian_convergence_deg
from vpr_rerank_ros.mapbuild import map_model
from vpr_rerank_ros.mapdb import MapBundle
from vpr_rerank_ros.evaluation import evaluate_queries

from conftest import lund_halves
from test_descriptors import small_model


def dms(value: float):
    value = abs(value)
    d, m = int(value), int((value % 1) * 60)
    return (IFDRational(d), IFDRational(m), IFDRational(round((value - d - m / 60) * 3600 * 1000), 1000))


def photo(path, lat=None, lon=None, direction=None, seed=0, size=(48, 64)):
    rng = np.random.default_rng(seed)
    exif = Image.Exif()
    if lat is not None:
        gps = {1: "N" if lat >= 0 else "S", 2: dms(lat), 3: "E" if lon >= 0 else "W", 4: dms(lon)}
        if direction is not None:
            gps[17] = IFDRational(round(direction * 10), 10)
        exif[ExifTags.IFD.GPSInfo] = gps
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, exif=exif)


def test_folder_with_exif_gps(tmp_path):
    # A walk due east along a street in Sydney (southern hemisphere), one photo without GPS.
    lat, lon0 = -33.8700, 151.2000
    step = 10.0 / (111_320 * np.cos(np.radians(lat)))
    for i in range(4):
        photo(tmp_path / f"{i:02d}.jpg", lat, lon0 + i * step)
    photo(tmp_path / "02b.jpg")                                   # no GPS: skipped, reported
    photo(tmp_path / "05.jpg", lat, lon0 + 5 * step, direction=200.0)
    images = geotagged.from_folder(tmp_path)
    assert [k for k, _ in images.items] == ["00", "01", "02", "03", "05"]
    assert "02b" in images.skipped and str(images.table.zone) == "56S"
    # Map headings are grid headings: due east is 90° minus the meridian convergence (about -1° here).
    convergence = meridian_convergence_deg(lat, lon0, images.table.zone)
    assert abs(convergence) > 0.5
    assert np.allclose(images.table.heading[:4], 90.0 - convergence, atol=0.05)   # direction of travel
    assert images.table.heading[4] == pytest.approx(200.0 - convergence, abs=0.05)  # EXIF GPSImgDirection
    assert np.allclose(np.diff(images.table.easting[:4]), 10.0, atol=0.2)
    (tmp_path / "headings.csv").write_text("name,heading\n01.jpg,10\n")
    overridden = geotagged.from_folder(tmp_path, tmp_path / "headings.csv").table.heading[1]
    assert overridden == pytest.approx(10.0 - convergence, abs=0.05)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .jpg"):
        geotagged.from_folder(empty)
    photo(empty / "a.jpg")
    with pytest.raises(ValueError, match="none of the 1 images"):
        geotagged.from_folder(empty)


def test_csv_sources(tmp_path):
    (tmp_path / "a.csv").write_text("path,lat,lon,heading\nimgs/x.jpg,55.70,13.19,90\nimgs/y.jpg,55.7001,13.19,45\n")
    images = geotagged.from_csv(tmp_path / "a.csv")
    assert [k for k, _ in images.items] == ["x", "y"] and images.items[0][1] == str(tmp_path / "imgs" / "x.jpg")
    assert str(images.table.zone) == "33N"
    assert np.allclose(images.table.heading + meridian_convergence_deg(55.70, 13.19, images.table.zone), [90, 45])
    (tmp_path / "b.csv").write_text("path,easting,northing,zone,heading,key\nx.jpg,386000,6174000,33N,0,first\n")
    b = geotagged.from_csv(tmp_path / "b.csv")
    assert b.items[0][0] == "first" and b.table.lat[0] == pytest.approx(55.70, abs=0.01)
    (tmp_path / "c.csv").write_text("path,heading\nx.jpg,0\n")
    with pytest.raises(ValueError, match="lat and lon"):
        geotagged.from_csv(tmp_path / "c.csv")
    (tmp_path / "d.csv").write_text("path,easting,northing,zone,heading\nx.jpg,1,2,33N,0\ny.jpg,1,2,34N,0\n")
    with pytest.raises(ValueError, match="one UTM zone"):
        geotagged.from_csv(tmp_path / "d.csv")
    (tmp_path / "e.csv").write_text("path,lat,lon\nx.jpg,1,2\n")
    with pytest.raises(ValueError, match="missing column"):
        geotagged.from_csv(tmp_path / "e.csv")


@pytest.mark.slow
def test_offline_default_retrieves_the_synthetic_town(synthetic_map):
    root, report = synthetic_map
    bundle = MapBundle.load(report.bundle.root)
    assert bundle.attachment("model.safetensors") is not None and bundle.meta.descriptor.stored_model
    query, database = load_city(root / "msls", "synth0")
    assert len(bundle) == len(database)
    run = evaluate_queries(bundle, map_model(bundle), query, k=10)
    assert run.metrics["queries"] == 32 and run.descriptors.shape == (32, bundle.dim)
    # Positives from the map agree with the dataset's own positives.
    assert [len(p) for p in run.positives] == [len(p) for p in positives(run.query, database, 25.0)]
    assert run.metrics["recall@1"] > 0.6 and run.metrics["recall@10"] > 0.85   # a clear majority at rank 1
    hinted = evaluate_queries(bundle, None, run.query, k=10, hint_noise_m=5.0, hint_radius=50.0,
                              descriptors=run.descriptors)
    assert hinted.result.restricted.all() and hinted.metrics["recall@1"] >= run.metrics["recall@1"]


def test_a_map_refuses_another_model(synthetic_map, tmp_path):
    _, report = synthetic_map
    other = tmp_path / "other.safetensors"
    save_model(small_model(), other)
    with pytest.raises(ValueError, match="does not match the map"):
        map_model(report.bundle, other)
    own = tmp_path / "own.safetensors"
    save_model(report.model, own)
    assert map_model(report.bundle, own).identity == report.model.identity


def test_vpr_map_query_writes_csv(synthetic_map, tmp_path, capsys):
    root, report = synthetic_map
    folder = tmp_path / "queries"
    folder.mkdir()
    query, _ = load_city(root / "msls", "synth0")
    for i in range(3):
        image = Image.open(query.image_path(i))
        if i == 0:   # one query carries its GPS position
            exif = Image.Exif()
            exif[ExifTags.IFD.GPSInfo] = {1: "N", 2: dms(query.lat[0]), 3: "E", 4: dms(query.lon[0])}
            image.save(folder / f"q{i}.jpg", exif=exif)
        else:
            image.save(folder / f"q{i}.jpg")
    out = tmp_path / "results.csv"
    assert map_main(["query", str(report.bundle.root), "--images", str(folder), "--top-k", "4", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0]) == ["query", "rank", "key", "score", "easting", "northing", "query_easting", "query_northing"]
    assert len(rows) == 12 and [r["rank"] for r in rows[:4]] == ["1", "2", "3", "4"]
    with_gps = [r for r in rows if r["query"] == "q0"]
    east, north, _ = latlon_to_utm(query.lat[0], query.lon[0], report.bundle.table.zone)
    assert float(with_gps[0]["query_easting"]) == pytest.approx(float(east), abs=0.5)
    assert all(r["query_easting"] == "" for r in rows if r["query"] != "q0")
    # a summary line per query: its top match, the score, and how far it is from the query's GPS position
    summary = capsys.readouterr().out.strip().splitlines()
    assert summary[0] == f"{out}: 12 rows for 3 queries" and len(summary) == 4
    top = with_gps[0]
    distance = np.hypot(float(top["easting"]) - float(top["query_easting"]),
                        float(top["northing"]) - float(top["query_northing"]))
    assert summary[1] == f"q0: {top['key']} (score {float(top['score']):.3f}), {distance:.1f} m from the query's GPS position"
    assert summary[2].startswith(f"q1: {rows[4]['key']} (score ") and summary[2].endswith(", query without GPS")
    assert map_main(["query", str(report.bundle.root), "--images", str(tmp_path / "nope"), "--out", str(out)]) == 1
    assert "no such folder" in capsys.readouterr().err


@pytest.mark.slow
def test_lund_even_frames_map_finds_odd_frames(shared_data, tmp_path):
    """Real photos: a map of the even Lund frames (offline default) retrieves each odd frame's place."""
    even, odd = lund_halves(shared_data, tmp_path)
    assert map_main(["build", "--out", str(tmp_path / "map"), "--images", str(even)]) == 0
    out = tmp_path / "q.csv"
    assert map_main(["query", str(tmp_path / "map"), "--images", str(odd), "--top-k", "1", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 15
    errors = [np.hypot(float(r["easting"]) - float(r["query_easting"]), float(r["northing"]) - float(r["query_northing"]))
              for r in rows]
    assert np.mean(np.array(errors) <= 25.0) >= 0.9


def test_build_with_external_weights_records_identity_only(synthetic_map, tmp_path, capsys):
    root, _ = synthetic_map
    weights = tmp_path / "tiny.safetensors"
    save_model(small_model(), weights)
    out = tmp_path / "map"
    assert map_main(["build", "--out", str(out), "--msls", str(root / "msls"), "--cities", "synth0",
                     "--model", str(weights), "--dtype", "float16"]) == 0
    bundle = MapBundle.load(out)
    assert bundle.attachment("model.safetensors") is None and not bundle.meta.descriptor.stored_model
    assert bundle.meta.descriptor.identity == small_model().identity and bundle.descriptors.dtype == np.float16
    queries = tmp_path / "q"
    queries.mkdir()
    query, _ = load_city(root / "msls", "synth0")
    Image.open(query.image_path(0)).save(queries / "q.jpg")
    results = tmp_path / "r.csv"
    assert map_main(["query", str(out), "--images", str(queries), "--out", str(results)]) == 1
    assert "stores no descriptor model" in capsys.readouterr().err
    assert map_main(["query", str(out), "--images", str(queries), "--out", str(results), "--model", str(weights)]) == 0
    assert map_main(["build", "--out", str(out), "--msls", str(root / "msls"), "--cities", "synth0",
                     "--model", str(weights)]) == 1                      # exists: needs --overwrite
    assert "already exists" in capsys.readouterr().err


def test_a_killed_build_resumes_describing_where_it_stopped(tmp_path, monkeypatch):
    """With a model, images are described into <out>.describing.h5 as they come: a build interrupted halfway
    leaves no map, and the next one describes only the rest and writes the same map as one uninterrupted build;
    an image removed in between (described, but no longer in the set) is left out."""
    from vpr_rerank_ros.descriptors.extract import DescriptorExtractor
    from vpr_rerank_ros.mapbuild import build_map

    lat, lon0 = 55.7000, 13.2000
    for i in range(12):
        photo(tmp_path / f"{i:02d}.jpg", lat, lon0 + i * 1e-4, direction=90.0, seed=i)
    images, model = geotagged.from_folder(tmp_path), small_model()
    real, described = DescriptorExtractor.run, []

    def run(self, batch, head=None):
        if len(described) == 1 and interrupt:
            raise KeyboardInterrupt
        described.append(len(batch))
        return real(self, batch, head)

    monkeypatch.setattr(DescriptorExtractor, "run", run)
    interrupt = True
    with pytest.raises(KeyboardInterrupt):
        build_map(tmp_path / "map", images, model, device="cpu", batch_size=2)
    assert not (tmp_path / "map").exists() and (tmp_path / "map.describing.h5").exists()
    interrupt, described[:] = False, []
    (tmp_path / "00.jpg").unlink()                   # described before the interruption, then removed
    images = geotagged.from_folder(tmp_path)
    resumed = build_map(tmp_path / "map", images, model, device="cpu", batch_size=2).bundle
    assert sum(described) == 10 and not (tmp_path / "map.describing.h5").exists()
    assert len(resumed) == 11 and "00" not in set(resumed.table.keys)
    whole = build_map(tmp_path / "whole", images, model, device="cpu", batch_size=2).bundle
    order = np.argsort(resumed.table.keys)
    assert np.allclose(resumed.descriptors[order], whole.descriptors[np.argsort(whole.table.keys)], atol=1e-6)


def test_an_offline_fit_on_a_sample_describes_the_rest_in_a_second_pass(tmp_path, monkeypatch):
    """Maps larger than the offline fit's PCA sample: the fitted model describes every image (resumably) and the
    map holds them all, with the model stored in it."""
    from functools import partial

    from vpr_rerank_ros import mapbuild

    for i in range(10):
        photo(tmp_path / f"{i:02d}.jpg", 55.70, 13.20 + i * 1e-4, direction=90.0, seed=i, size=(240, 320))
    monkeypatch.setattr(mapbuild, "fit_offline_model", partial(mapbuild.fit_offline_model, pca_images=6))
    report = mapbuild.build_map(tmp_path / "map", geotagged.from_folder(tmp_path), device="cpu")
    assert len(report.bundle) == 10 and report.bundle.attachment("model.safetensors") is not None
    assert report.bundle.meta.descriptor.stored_model and not (tmp_path / "map.describing.h5").exists()
    assert map_model(report.bundle).identity == report.model.identity
