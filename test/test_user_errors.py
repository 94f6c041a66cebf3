"""Every user error is one line (issue 15 §7): the CLIs and the node name the problem in one line on stderr, never
a traceback, and exit 1 for a user error, 2 for bad usage, 130 for Ctrl-C; warnings the user should act on are
printed, not left to chance."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from vpr_rerank_ros.cli import INTERRUPTED, map_main, weights_main
from vpr_rerank_ros.datasets import geotagged
from vpr_rerank_ros.descriptors.model import save_model
from vpr_rerank_ros.mapbuild import MIN_OFFLINE_DIM

from test_descriptors import small_model
from test_mapbuild import photo

NO_CUDA = not torch.cuda.is_available()


def one_line(stderr: str) -> str:
    """The single line of `stderr`, which must hold no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def write_csv(path, rows, header="path,lat,lon,heading"):
    path.write_text("\n".join([header, *(",".join(str(v) for v in row) for row in rows)]) + "\n")
    return path


def test_a_file_that_is_not_a_mat_file_is_one_line(tmp_path, capsys):
    for name, content in (("text.mat", b"not a MATLAB file\n"), ("empty.mat", b"")):
        (tmp_path / name).write_bytes(content)
        assert weights_main(["convert", str(tmp_path / name), str(tmp_path / "out.safetensors")]) == 1
        assert one_line(capsys.readouterr().err) == (f"vpr-weights: {tmp_path / name}: not a MatConvNet struct "
                                                     "export with net.layers (MatReadError: Mat file appears to be "
                                                     "truncated)")
    images = write_csv(tmp_path / "images.csv", [("a.jpg", 55.7, 13.19, 90), ("b.jpg", 55.7001, 13.19, 90)])
    assert map_main(["build", "--out", str(tmp_path / "map"), "--csv", str(images), "--model",
                     str(tmp_path / "text.mat")]) == 1
    assert "text.mat: not a MatConvNet struct export" in one_line(capsys.readouterr().err)


def test_vpr_map_build_refuses_before_any_work(tmp_path, capsys):
    """An existing map without --overwrite, or a device this machine lacks, is refused before the images are read
    (here they do not even exist) or the model loaded."""
    (tmp_path / "map").mkdir()
    common = ["--images", str(tmp_path / "no_photos"), "--model", str(tmp_path / "no_weights.mat")]
    assert map_main(["build", "--out", str(tmp_path / "map"), *common]) == 1
    assert one_line(capsys.readouterr().err) == (f"vpr-map: {tmp_path / 'map'} already exists (pass overwrite=True, "
                                                 "or --overwrite, to replace it)")
    assert map_main(["build", "--out", str(tmp_path / "new"), *common, "--device", "gpu0"]) == 1
    assert one_line(capsys.readouterr().err) == "vpr-map: unknown device 'gpu0': expected auto, cpu, cuda or cuda:N"
    if NO_CUDA:
        assert map_main(["build", "--out", str(tmp_path / "new"), *common, "--device", "cuda"]) == 1
        assert "device 'cuda' needs CUDA, which is not available here" in one_line(capsys.readouterr().err)


def test_ctrl_c_during_a_build_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    from vpr_rerank_ros.descriptors.extract import DescriptorExtractor

    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(4):
        photo(photos / f"{i:02d}.jpg", 55.7, 13.2 + i * 1e-4, direction=90.0, seed=i)
    weights = tmp_path / "tiny.safetensors"
    save_model(small_model(), weights)

    def interrupted(self, batch, head=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(DescriptorExtractor, "run", interrupted)
    out = tmp_path / "map"
    assert map_main(["build", "--out", str(out), "--images", str(photos), "--model", str(weights),
                     "--device", "cpu"]) == INTERRUPTED == 130
    err = capsys.readouterr().err   # after the progress bar
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        f"vpr-map: interrupted; no map written; the images described so far are kept in {out}.describing.h5, and "
        "the same command resumes from them")
    assert not out.exists()


def test_a_bad_csv_value_is_reported_with_its_line(tmp_path, capsys):
    good = ("a.jpg", 55.7, 13.19, 90)
    for bad, message in ((("b.jpg", 95.2, 13.19, 90), "lat must be a number in [-90, 90], got '95.2'"),
                         (("b.jpg", 55.7, "", 90), "lon must be a number in [-180, 180], got ''"),
                         (("b.jpg", 55.7, 13.19, 400), "heading must be a number in [-180, 360], got '400'")):
        images = write_csv(tmp_path / "images.csv", [good, bad])
        with pytest.raises(ValueError) as error:
            geotagged.from_csv(images)
        assert str(error.value) == f"{images}: line 3: {message}"
    assert map_main(["build", "--out", str(tmp_path / "map"), "--csv", str(images)]) == 1
    assert one_line(capsys.readouterr().err) == f"vpr-map: {images}: line 3: {message}"
    utm = write_csv(tmp_path / "utm.csv", [("a.jpg", 386000, "north", "33N", 0)],
                    header="path,easting,northing,zone,heading")
    with pytest.raises(ValueError, match=r"utm.csv: line 2: northing must be a number, got 'north'"):
        geotagged.from_csv(utm)
    signed = write_csv(tmp_path / "signed.csv", [good, ("b.jpg", 55.7001, 13.19, -90)])   # signed headings are fine
    assert geotagged.from_csv(signed).table.heading[1] == pytest.approx(270.0, abs=2.0)


def test_a_map_of_a_handful_of_images_warns_about_its_descriptor(tmp_path, capsys):
    """The offline default's PCA keeps at most N - 1 dimensions for N map images: a map of 3 builds, loudly."""
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(tmp_path / f"{i}.jpg")
    images = write_csv(tmp_path / "three.csv", [(f"{i}.jpg", 55.7, 13.19 + i * 1e-4, 90) for i in range(3)])
    assert map_main(["build", "--out", str(tmp_path / "map"), "--csv", str(images), "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (f"vpr-map: WARNING: the offline descriptor has only 2 dimensions: its PCA whitening is fitted on the 3 "
            f"map images and keeps at most one fewer; retrieval with it is unreliable. Build from at least "
            f"{MIN_OFFLINE_DIM + 1} images, or give trained weights with --model") in err.splitlines()


@pytest.mark.ros
def test_node_start_up_errors_help_and_unknown_parameters(tmp_path):
    """Each node is a subprocess; they start together. A wrong parameter type or device is one line and exit 1,
    an unknown parameter a warning that names the close known one, --help the parameters and exit 0."""
    from vpr_rerank_ros.node import PARAMETERS

    missing = str(tmp_path / "no_map")
    cases = {   # name: (parameters, or the node's own arguments, exit code, its one error line)
        "help": (["--help"], 0, None),
        "usage": (["--verbose"], 2, "vpr_localizer: unknown argument(s) --verbose: parameters go after --ros-args "
                                    "(vpr_localizer --help lists them)"),
        "type": ({"map_path": missing, "top_kk": 5, "top_k": "abc"}, 1,
                 "vpr_localizer: parameter top_k takes an integer, got 'abc' (string)"),
        "float": ({"map_path": missing, "rate_hz": 10}, 1, "vpr_localizer: parameter rate_hz takes a number with "
                                                          "a decimal point (such as 10.0), got 10 (integer)"),
        "device": ({"map_path": missing, "device": "gpu0"}, 1,
                   "vpr_localizer: unknown device 'gpu0': expected auto, cpu, cuda or cuda:N"),
    }
    if NO_CUDA:
        cases["cuda"] = ({"map_path": missing, "device": "cuda"}, 1, "vpr_localizer: device 'cuda' needs CUDA, "
                         f"which is not available here (torch {torch.__version__}: a CPU-only build); use cpu or auto")
    processes = {}
    for name, (given, _, _) in cases.items():
        if isinstance(given, dict):
            params = tmp_path / f"{name}.yaml"
            params.write_text(yaml.safe_dump({"/**": {"ros__parameters": given}}))
            given = ["--ros-args", "--params-file", str(params)]
        processes[name] = subprocess.Popen([sys.executable, "-m", "vpr_rerank_ros.node", *given], text=True,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                           env={**os.environ, "ROS_HOME": str(tmp_path / "ros_home")})
    stdout = {}
    for name, process in processes.items():
        stdout[name], err = process.communicate(timeout=120)
        _, code, line = cases[name]
        assert process.returncode == code, (name, stdout[name], err)
        if line is None:
            continue
        warnings = [w for w in err.splitlines() if w.startswith("[WARN]")]
        assert one_line("\n".join(w for w in err.splitlines() if w not in warnings)) == line, name
        if name == "type":
            assert len(warnings) == 1 and warnings[0].endswith(
                "ignoring unknown parameter top_kk (did you mean top_k?); vpr_localizer --help lists the parameters")
        else:
            assert not warnings, (name, err)
    help_text = stdout["help"]
    assert help_text.startswith("usage: vpr_localizer")
    assert all(f"  {name}" in help_text and text in help_text for name, (_, text) in PARAMETERS.items())
