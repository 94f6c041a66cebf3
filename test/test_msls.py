"""The MSLS reader/writer on the official layout: filtering, the test split, prediction files, bad input."""
import csv
import shutil

import numpy as np
import pytest

from vpr_rerank_ros.datasets.msls import (DEFAULT_CITIES, MslsError, load_city, load_side, positives,
                                          read_predictions, resolve_cities, split_of, write_predictions, write_side)
from vpr_rerank_ros.images import ImageError, read_rgb

SUBTASK_NAMES = ("all", "s2w", "w2s", "o2n", "n2o", "d2n", "n2d")


def write_city(root, city, n=6, pano=None, split="train_val", side="query"):
    """A small hand-made side: n images 10 m apart along a street in Lund."""
    directory = root / split / city / side
    keys = [f"k{i}" for i in range(n)]
    east = 386000.0 + 10.0 * np.arange(n)
    subtasks = {name: np.ones(n, bool) for name in SUBTASK_NAMES}
    subtasks["d2n"] = np.arange(n) % 2 == 0
    write_side(directory, keys=keys, lat=np.full(n, 55.70), lon=np.full(n, 13.19), heading=np.full(n, 90.0),
               captured_at=np.arange(n) * 1000, easting=east, northing=np.full(n, 6174000.0),
               sequence_key=["s0"] * n, frame_number=range(n), night=np.zeros(n, bool), subtasks=subtasks, pano=pano)
    (directory / "images").mkdir(exist_ok=True)
    return directory


def rewrite_column(path, column, transform):
    rows = list(csv.reader(open(path)))
    header = rows[0]
    if transform is None:
        keep = [i for i, h in enumerate(header) if h != column]
        rows = [[r[i] for i in keep] for r in rows]
    else:
        j = header.index(column)
        for r in rows[1:]:
            r[j] = transform(r[j])
    with open(path, "w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)


def test_round_trip_filters_panoramas_and_subtasks(tmp_path):
    write_city(tmp_path, "lund", pano=[False, True, False, False, False, True])
    write_city(tmp_path, "lund", side="database")
    query, database = load_city(tmp_path, "lund")
    assert list(query.keys) == ["k0", "k2", "k3", "k4"]          # panoramas excluded
    assert len(load_side(tmp_path, "lund", "query", exclude_panos=False)) == 6
    assert list(load_side(tmp_path, "lund", "query", subtask="d2n").keys) == ["k0", "k2", "k4"]
    assert query.zone is not None and str(query.zone) == "33N"
    assert np.allclose(query.easting, [386000, 386020, 386030, 386040])
    assert [len(p) for p in positives(query, database, 15.0)] == [2, 3, 3, 3]
    assert query.image_path(0).name == "k0.jpg" and query.frame_number.tolist() == [0, 2, 3, 4]


def test_city_lists_and_splits(tmp_path):
    assert resolve_cities(tmp_path, "val") == ["cph", "sf"]
    assert resolve_cities(tmp_path, "train") == DEFAULT_CITIES["train"] and len(DEFAULT_CITIES["train"]) == 22
    assert resolve_cities(tmp_path, "amman,austin") == ["amman", "austin"]
    assert split_of("miami") == "test" and split_of("cph") == "train_val" and split_of("synth0") == "train_val"
    write_city(tmp_path, "lund")
    assert resolve_cities(tmp_path, None) == ["lund"]
    with pytest.raises(MslsError, match="no cities"):
        resolve_cities(tmp_path / "empty", None)


def test_test_split_has_no_positions(tmp_path):
    directory = write_city(tmp_path, "miami", split="test")
    (directory / "raw.csv").unlink()
    (directory / "postprocessed.csv").unlink()
    side = load_side(tmp_path, "miami", "query")
    assert len(side) == 6 and not side.has_positions and np.isnan(side.easting).all()
    with pytest.raises(MslsError, match="no positions"):
        positives(side, side)


@pytest.mark.parametrize("problem, match", [
    ("missing_column", r"postprocessed\.csv: missing column\(s\) easting"),
    ("not_a_number", r"raw\.csv: column 'lat' holds a non-number"),
    ("not_a_bool", r"raw\.csv: column 'pano' holds 'maybe'"),
    ("missing_file", r"seq_info\.csv: missing"),
    ("empty_city", "has no query images"),
    ("keys_differ", r"raw\.csv: its keys do not match"),
    ("no_directory", "no such directory"),
])
def test_bad_input_names_the_problem(tmp_path, problem, match):
    directory = write_city(tmp_path, "lund")
    if problem == "missing_column":
        rewrite_column(directory / "postprocessed.csv", "easting", None)
    elif problem == "not_a_number":
        rewrite_column(directory / "raw.csv", "lat", lambda v: "north")
    elif problem == "not_a_bool":
        rewrite_column(directory / "raw.csv", "pano", lambda v: "maybe")
    elif problem == "missing_file":
        (directory / "seq_info.csv").unlink()
    elif problem == "empty_city":
        for name in ("seq_info.csv", "subtask_index.csv", "raw.csv", "postprocessed.csv"):
            lines = (directory / name).read_text().splitlines()
            (directory / name).write_text(lines[0] + "\n")
    elif problem == "keys_differ":
        rewrite_column(directory / "raw.csv", "key", lambda v: v + "x")
    elif problem == "no_directory":
        shutil.rmtree(directory)
    with pytest.raises(MslsError, match=match):
        load_side(tmp_path, "lund", "query")


def test_corrupt_and_missing_images(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ImageError, match=r"bad\.jpg: not a decodable image"):
        read_rgb(bad)
    with pytest.raises(ImageError, match="cannot read"):
        read_rgb(tmp_path / "absent.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        read_rgb(tmp_path / "empty.jpg")


def test_prediction_files(tmp_path):
    path = tmp_path / "pred.txt"
    write_predictions(path, ["q1", "q2"], [["a", "b", "c"], ["c"]])
    assert path.read_text() == "q1 a b c\nq2 c\n"
    assert read_predictions(path) == {"q1": ["a", "b", "c"], "q2": ["c"]}
    path.write_text("q1 a\nq1 b\n")
    with pytest.raises(MslsError, match="twice"):
        read_predictions(path)
    with pytest.raises(ValueError, match="ranked lists"):
        write_predictions(path, ["q1"], [])
