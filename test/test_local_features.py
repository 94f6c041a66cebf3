"""Local features: OpenCV extractors on images with a known shift, the resumable feature store in hloc's layout,
and local features in a map bundle (build, resume, load, verify, info, corrupt or missing file)."""
import json

import cv2
import h5py
import numpy as np
import pytest
from PIL import ExifTags, Image
from PIL.TiffImagePlugin import IFDRational

from vpr_rerank_ros.cli import INTERRUPTED, map_main
from vpr_rerank_ros.datasets import geotagged
from vpr_rerank_ros.images import read_rgb
from vpr_rerank_ros.feature_store import FEATURES_FILE, FeatureFile, FeatureStore
from vpr_rerank_ros.local_features import EXTRACTORS, OpenCVExtractor
from vpr_rerank_ros.mapbuild import build_map
from vpr_rerank_ros.mapdb import MapBundle, MapError, _sha256

from test_mapbuild import dms


def scene(seed, size=(240, 320)):
    """An RGB image of random blocks, blurred: corners and blobs every detector finds."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (size[0] // 16, size[1] // 16, 3), dtype=np.uint8)
    return cv2.GaussianBlur(cv2.resize(blocks, size[::-1], interpolation=cv2.INTER_NEAREST), (5, 5), 1.5)


@pytest.mark.parametrize("name", EXTRACTORS)
def test_extractors_find_a_known_shift(name):
    """Matching the features of an image and of the same image shifted by (13, 7) pixels recovers the shift."""
    image = scene(0)
    shifted = np.roll(image, (7, 13), axis=(0, 1))
    extractor = OpenCVExtractor(name, max_keypoints=500)
    a, b = extractor(image), extractor(shifted)
    assert 50 <= len(a.keypoints) <= 500 and a.image_size == (320, 240)
    assert np.all(np.diff(a.scores) <= 0)                        # strongest first
    binary = name in ("orb", "akaze")
    assert a.descriptors.dtype == (np.uint8 if binary else np.float16)
    assert a.descriptors.shape == (len(a.keypoints), {"sift": 128, "rootsift": 128, "orb": 32, "akaze": 61}[name])
    if binary:
        matcher, da, db = cv2.BFMatcher(cv2.NORM_HAMMING, crossCheck=True), a.descriptors, b.descriptors
    else:
        assert np.allclose(np.linalg.norm(a.descriptors.astype(np.float32), axis=1), 1.0, atol=2e-3)
        matcher, da, db = cv2.BFMatcher(cv2.NORM_L2, crossCheck=True), *(d.astype(np.float32) for d in (a.descriptors,
                                                                                                      b.descriptors))
    matches = matcher.match(da, db)
    moved = np.array([b.keypoints[m.trainIdx] - a.keypoints[m.queryIdx] for m in matches])
    inside = (a.keypoints[[m.queryIdx for m in matches]] < [320 - 20, 240 - 20]).all(axis=1)
    assert np.allclose(np.median(moved[inside], axis=0), [13, 7], atol=0.5)
    assert np.mean(np.abs(moved[inside] - [13, 7]).max(axis=1) < 2.5) > 0.8     # ORB's coarse levels: ~2 px


def test_large_images_are_shrunk_and_keypoints_given_in_their_own_pixels():
    """max_side shrinks the image before detection; keypoints come back in the stored image's pixels."""
    image = scene(1, size=(300, 400))
    small = cv2.resize(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), (200, 150), interpolation=cv2.INTER_AREA)
    big = OpenCVExtractor("sift", max_side=200)(image)
    direct = OpenCVExtractor("sift")(cv2.cvtColor(small, cv2.COLOR_GRAY2RGB))
    assert big.image_size == (400, 300) and len(big.keypoints) == len(direct.keypoints) > 20
    assert np.allclose(big.keypoints, (direct.keypoints + 0.5) * 2 - 0.5, atol=1e-3)
    with pytest.raises(ValueError, match="unknown local feature extractor 'surf'"):
        OpenCVExtractor("surf")
    with pytest.raises(ValueError, match="uint8 RGB"):
        OpenCVExtractor("orb")(np.zeros((10, 10), np.uint8))


def test_the_store_writes_hloc_layout_and_resumes(tmp_path):
    path, extractor = tmp_path / "f.h5", OpenCVExtractor("rootsift", max_keypoints=300)
    features = {key: extractor(scene(i)) for i, key in enumerate(["a", "b", "db/c"])}
    with FeatureStore(path, extractor.name, extractor.settings) as store:
        for key, f in features.items():
            store.write(key, f)
        with pytest.raises(ValueError, match="32-D uint8 descriptors, .* holds 128-D float16"):
            store.write("d", OpenCVExtractor("orb")(scene(3)))
    with h5py.File(path, "a") as file:               # hloc's layout: (D, N) descriptors, nested groups for '/'
        assert file["a/descriptors"].shape == (128, len(features["a"].keypoints))
        assert set(file["a"]) == {"keypoints", "descriptors", "scores", "image_size"}
        assert list(file["a/image_size"][()]) == [320, 240] and list(file["db"]) == ["c"]
        file.create_group("half")["keypoints"] = np.zeros((3, 2), np.float32)   # a write cut short
    with FeatureStore(path, extractor.name, extractor.settings) as store:
        assert store.done == {"a", "b", "db/c"}                  # the half-written entry is dropped
        store.keep(["a", "db/c"])
    with pytest.raises(ValueError, match="holds features of rootsift .* not sift"):
        FeatureStore(path, "sift", extractor.settings)
    read = FeatureFile(path)
    assert read.count == 2 and read.dim == 128 and read.dtype == "float16"
    for key in ("a", "db/c"):
        back, orig = read.read(key), features[key]
        assert np.array_equal(back.keypoints, orig.keypoints) and np.array_equal(back.descriptors, orig.descriptors)
        assert np.array_equal(back.scores, orig.scores) and back.image_size == orig.image_size
    read.check(["a", "db/c"], every_entry=True)
    with pytest.raises(ValueError, match="entry 'b': missing"):
        read.check(["a", "b"], every_entry=True)
    with pytest.raises(ValueError, match="features of 2 images, the map has 3"):
        read.check(["a", "b", "db/c"], every_entry=False)


def photos(folder, n=6):
    """n geotagged photos of textured scenes along a street, and a descriptor file for them (random unit rows)."""
    folder.mkdir()
    for i in range(n):
        exif = Image.Exif()
        exif[ExifTags.IFD.GPSInfo] = {1: "N", 2: dms(55.70), 3: "E", 4: dms(13.20 + i * 1e-4), 17: IFDRational(90)}
        Image.fromarray(scene(i)).save(folder / f"{i:02d}.jpg", exif=exif, quality=95)
    rows = np.random.default_rng(0).normal(size=(n, 16)).astype(np.float32)
    descriptors = folder.parent / "descriptors.h5"
    with h5py.File(descriptors, "w") as file:
        file["keys"] = [f"{i:02d}" for i in range(n)]
        file["descriptors"] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return geotagged.from_folder(folder), descriptors


def test_a_map_with_local_features_builds_resumably_and_loads(tmp_path, monkeypatch, capsys):
    images, descriptors = photos(tmp_path / "photos")
    real, calls = OpenCVExtractor.__call__, []

    def counted(self, rgb):
        if len(calls) == 3 and interrupt:
            raise KeyboardInterrupt
        calls.append(1)
        return real(self, rgb)

    monkeypatch.setattr(OpenCVExtractor, "__call__", counted)
    interrupt, out = True, tmp_path / "map"
    assert map_main(["build", "--images", str(tmp_path / "photos"), "--descriptors", str(descriptors),
                     "--local-features", "sift", "--out", str(out)]) == INTERRUPTED
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"vpr-map: interrupted; no map written; the local features extracted so far are kept in {out}.features.h5, "
        "and the same command resumes from them")
    assert not out.exists() and FeatureFile(tmp_path / "map.features.h5").count == 3
    interrupt, calls[:] = False, []
    bundle = build_map(out, images, descriptor_file=descriptors, local_features="sift").bundle
    assert len(calls) == 3 and not (tmp_path / "map.features.h5").exists()     # only the rest extracted
    meta = json.loads((out / "map.json").read_text())
    assert meta["files"][FEATURES_FILE]["sha256"] == _sha256(out / FEATURES_FILE)
    features = MapBundle.load(out).local_features
    direct = real(OpenCVExtractor("sift"), read_rgb(tmp_path / "photos" / "04.jpg"))
    assert np.array_equal(features.read("04").keypoints, direct.keypoints)
    assert np.array_equal(features.read("04").descriptors, direct.descriptors)
    assert map_main(["info", str(out)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["local_features"] == {"extractor": "sift", "max_keypoints": 2048, "max_side": 1024, "dim": 128,
                                      "dtype": "float16", "images": 6}
    assert FEATURES_FILE in info["attachments"] and len(bundle) == 6
    plain = build_map(tmp_path / "plain", images, descriptor_file=descriptors).bundle   # as before: no features
    assert plain.local_features is None and set(plain.meta.files) == {"images.csv", "descriptors.npy",
                                                                      "index.faiss", "overlap.npz"}
    with pytest.raises(ValueError, match="not both"):
        build_map(tmp_path / "x", images, descriptor_file=descriptors, local_features="sift",
                  local_features_file=tmp_path / "feats.h5")


def rewrite(root, edit):
    """Change local_features.h5 with `edit(h5 file)` and record its new size and checksum in map.json, so that
    only the content check can catch it."""
    path = root / FEATURES_FILE
    with h5py.File(path, "a") as file:
        edit(file)
    meta = json.loads((root / "map.json").read_text())
    meta["files"][FEATURES_FILE] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    (root / "map.json").write_text(json.dumps(meta))


def test_a_missing_or_corrupt_features_file_is_refused_by_name(tmp_path, capsys):
    images, descriptors = photos(tmp_path / "photos", n=4)
    out = tmp_path / "map"
    assert map_main(["build", "--images", str(tmp_path / "photos"), "--descriptors", str(descriptors),
                     "--local-features", "orb", "--out", str(out)]) == 0
    assert map_main(["verify", str(out)]) == 0
    path, good = out / FEATURES_FILE, (out / FEATURES_FILE).read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    assert map_main(["verify", str(out)]) == 1
    assert f"{path}: checksum mismatch" in capsys.readouterr().err
    path.write_bytes(b"\0" * len(good))                          # same size: only the format check catches it
    with pytest.raises(MapError, match=f"{path}: not a readable HDF5 file"):
        MapBundle.load(out, verify=False)
    path.write_bytes(good)
    rewrite(out, lambda file: file["02"].pop("descriptors"))
    with pytest.raises(MapError, match=f"{path}: entry '02': no dataset descriptors"):
        MapBundle.load(out)
    path.write_bytes(good)
    rewrite(out, lambda file: file["01/image_size"].write_direct(np.array([0, 5])))
    with pytest.raises(MapError, match=f"{path}: entry '01': image_size"):
        MapBundle.load(out)
    path.write_bytes(good)
    rewrite(out, lambda file: file.move("03", "99"))
    with pytest.raises(MapError, match=f"{path}: entry '03': missing"):
        MapBundle.load(out)
    path.unlink()
    with pytest.raises(MapError, match=f"{path}: missing"):
        MapBundle.load(out)
