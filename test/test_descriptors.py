"""NetVLAD descriptors: the layer's invariants, the three weight formats against reference forwards written
here from the format descriptions, extraction (batching, failures, resumable store) and the offline default."""
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
import torch
import torch.nn.functional as F

from vpr_rerank_ros.cli import map_main, weights_main
from vpr_rerank_ros.descriptors.backbones import EfficientNetLite0, imagenet_lite0_weights
from vpr_rerank_ros.descriptors.extract import DescriptorExtractor, DescriptorStore, read_descriptors
from vpr_rerank_ros.descriptors.loaders import load_matconvnet, load_model, load_pytorch_netvlad
from vpr_rerank_ros.descriptors.model import (IMAGENET_MEAN, IMAGENET_STD, DescriptorConfig, GlobalDescriptor,
                                              NetVLAD, load_native, save_model)
from vpr_rerank_ros.descriptors.sharded import parts_folder

VGG_CONVS = [(3, 64), (64, 64), "M", (64, 128), (128, 128), "M", (128, 256), (256, 256), (256, 256), "M",
             (256, 512), (512, 512), (512, 512), "M", (512, 512), (512, 512), (512, 512)]
MEAN_255 = np.array([122.7, 116.7, 104.0])


def random_vgg(seed):
    """Random VGG16 conv weights (OUT, IN, 3, 3) and biases, scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    return [None if c == "M" else (torch.randn(c[1], c[0], 3, 3, generator=g) * (2.0 / (9 * c[0])) ** 0.5,
                                   torch.randn(c[1], generator=g) * 0.01) for c in VGG_CONVS]


def reference_vgg(x, convs):
    """VGG16 conv1_1..conv5_3 written out: conv+ReLU, 2x2 max-pools, no ReLU after conv5_3."""
    for i, layer in enumerate(convs):
        if layer is None:
            x = F.max_pool2d(x, 2, 2)
        else:
            x = F.conv2d(x, layer[0], layer[1], padding=1)
            if i < len(convs) - 1:
                x = F.relu(x)
    return x


def reference_vlad(features, assign_w, assign_b, centres_kd):
    """NetVLAD by explicit loops over clusters: (D, N) normalised features -> (K, D) intra-normalised residual sums."""
    scores = assign_w @ features + (0 if assign_b is None else assign_b[:, None])     # (K, N)
    a = torch.softmax(scores, dim=0)
    rows = []
    for k in range(len(centres_kd)):
        residual = ((features - centres_kd[k][:, None]) * a[k][None, :]).sum(dim=1)
        rows.append(residual / residual.norm().clamp_min(1e-12))
    return torch.stack(rows)


def test_netvlad_invariants_and_loop_reference():
    torch.manual_seed(0)
    d, k, n = 16, 5, 30
    x = F.normalize(torch.randn(3, d, n), dim=1)
    for layout in ("dk", "kd"):
        layer = NetVLAD(d, k, layout)
        torch.nn.init.normal_(layer.assign.weight)
        torch.nn.init.normal_(layer.centres)
        out = layer(x)
        assert out.shape == (3, d * k)
        assert torch.allclose(out.norm(dim=1), torch.ones(3), atol=1e-6)
        blocks = out.view(3, d, k).transpose(1, 2) if layout == "dk" else out.view(3, k, d)
        assert torch.allclose(blocks.norm(dim=2), torch.full((3, k), k ** -0.5), atol=1e-6)  # intra-normalised
        for b in range(3):
            ref = reference_vlad(x[b], layer.assign.weight[:, :, 0], None, layer.centres.T)   # (K, D)
            ref = (ref.T.reshape(-1) if layout == "dk" else ref.reshape(-1))
            assert torch.allclose(out[b], ref / ref.norm(), atol=1e-6)


def test_full_size_vgg16_netvlad_gives_4096_unit_vectors():
    model = GlobalDescriptor(DescriptorConfig())
    assert (model.config.vlad_dim, model.output_dim) == (32768, 4096)
    with torch.no_grad():
        out = model(torch.rand(2, 3, 64, 80))
    assert out.shape == (2, 4096) and torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


@pytest.fixture(scope="module")
def matconvnet_file(tmp_path_factory):
    """A MatConvNet struct export like hloc's, with K = 4 clusters and whitening 2048 -> 16."""
    convs = random_vgg(1)
    rng = np.random.default_rng(2)
    layers = []
    for layer in convs:
        if layer is None:
            layers.append({"type": "pool", "weights": np.empty((0,), dtype=object)})
        else:
            weights = np.empty(2, dtype=object)
            weights[0] = layer[0].permute(2, 3, 1, 0).numpy()              # S x S x IN x OUT
            weights[1] = layer[1].numpy()
            layers += [{"type": "conv", "weights": weights}, {"type": "relu", "weights": np.empty((0,), dtype=object)}]
    layers = layers[:-1]                                                    # 29 layers: conv5_3 is the last
    while len(layers) < 34:
        layers.append({"type": "other", "weights": np.empty((0,), dtype=object)})
    assignment, centres = rng.normal(size=(512, 4)) * 5, rng.normal(size=(512, 4)) * 0.05
    netvlad = np.empty(2, dtype=object)
    netvlad[0], netvlad[1] = assignment.astype(np.float32), (-centres).astype(np.float32)   # centres stored negated
    layers[30] = {"type": "netvlad", "weights": netvlad}
    whiten = np.empty(2, dtype=object)
    w = rng.normal(size=(16, 2048)) * 0.05
    whiten[0], whiten[1] = w.T.reshape(1, 1, 2048, 16).astype(np.float32), rng.normal(size=16).astype(np.float32)
    layers[33] = {"type": "conv", "weights": whiten}
    cell = np.empty(len(layers), dtype=object)
    cell[:] = layers
    average = np.tile(MEAN_255, (4, 4, 1))                                  # hloc reads averageImage[0, 0]
    path = tmp_path_factory.mktemp("weights") / "Test_struct.mat"
    scipy.io.savemat(path, {"net": {"layers": cell, "meta": {"normalization": {"averageImage": average}}}})
    return path, convs, assignment, centres, w, whiten[1]


def test_matconvnet_loader_matches_reference(matconvnet_file):
    path, convs, assignment, centres, w, b = matconvnet_file
    model = load_matconvnet(path)
    assert model.config.clusters == 4 and model.output_dim == 16 and model.config.vlad_layout == "dk"
    image = torch.rand(2, 3, 48, 64)
    with torch.no_grad():
        got = model(image)
        x = image * 255 - torch.tensor(MEAN_255, dtype=torch.float32).view(1, 3, 1, 1)
        feats = F.normalize(reference_vgg(x, convs).flatten(2), dim=1)
        for i in range(2):
            vlad = reference_vlad(feats[i], torch.tensor(assignment.T, dtype=torch.float32), None,
                                  torch.tensor(centres.T, dtype=torch.float32))
            flat = vlad.T.reshape(-1)                                     # MatConvNet order: d * K + k
            flat = flat / flat.norm()
            white = torch.tensor(w, dtype=torch.float32) @ flat + torch.tensor(b)
            assert torch.allclose(got[i], white / white.norm(), atol=2e-5)


def test_pytorch_netvlad_loader_matches_reference(tmp_path):
    convs = random_vgg(3)
    g = torch.Generator().manual_seed(4)
    indices = [i for i, layer in enumerate(_torchvision_indices()) if layer]
    state = {}
    for index, layer in zip(indices, [c for c in convs if c is not None]):
        state[f"encoder.{index}.weight"], state[f"encoder.{index}.bias"] = layer
    k, pcs = 3, 8
    state["pool.conv.weight"] = torch.randn(k, 512, 1, 1, generator=g) * 5
    state["pool.centroids"] = torch.randn(k, 512, generator=g) * 0.05
    state["WPCA.0.weight"] = torch.randn(pcs, k * 512, 1, 1, generator=g) * 0.05
    state["WPCA.0.bias"] = torch.randn(pcs, generator=g)
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"epoch": 3, "best_score": 0.9, "state_dict": {f"module.{k_}": v for k_, v in state.items()}}, path)
    model = load_model(path)
    assert model.config.vlad_layout == "kd" and model.output_dim == pcs and model.config.input_scale == 1.0
    image = torch.rand(1, 3, 40, 56)
    with torch.no_grad():
        x = (image - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        feats = F.normalize(reference_vgg(x, convs).flatten(2), dim=1)[0]
        vlad = reference_vlad(feats, state["pool.conv.weight"][:, :, 0, 0], None, state["pool.centroids"])
        flat = vlad.reshape(-1)                                           # pytorch-NetVlad order: k * D + d
        flat = flat / flat.norm()
        white = state["WPCA.0.weight"].reshape(pcs, -1) @ flat + state["WPCA.0.bias"]
        assert torch.allclose(model(image)[0], white / white.norm(), atol=2e-5)


def _torchvision_indices():
    """True at the indices of torchvision's vgg16.features that are convolutions (up to conv5_3)."""
    flags = []
    for c in VGG_CONVS:
        flags += [False] if c == "M" else [True, False]
    return flags[:-1]


def test_native_format_and_converter(matconvnet_file, tmp_path, capsys):
    path = matconvnet_file[0]
    original = load_matconvnet(path)
    target = tmp_path / "netvlad.safetensors"
    assert weights_main(["convert", str(path), str(target)]) == 0
    assert original.identity in capsys.readouterr().out
    native = load_native(target)
    assert native.identity == original.identity and native.config == original.config
    image = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(native(image), original(image))
    # The JSON records the identity: a changed config is caught.
    text = target.with_suffix(".json").read_text().replace('"max_side": 1024', '"max_side": 512')
    target.with_suffix(".json").write_text(text)
    with pytest.raises(ValueError, match="identity mismatch"):
        load_native(target)


def test_loader_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown weights format"):
        load_model(tmp_path / "weights.onnx")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "absent.mat")
    bad = tmp_path / "bad.pth"
    torch.save({"state_dict": {"encoder.0.weight": torch.zeros(1)}}, bad)
    with pytest.raises(ValueError, match="pool.centroids"):
        load_pytorch_netvlad(bad)
    torch.save({"state_dict": {"pool.centroids": torch.zeros(2, 512), "pool.conv.weight": torch.zeros(2, 512, 1, 1)}},
               bad)
    with pytest.raises(ValueError, match=r"missing \['backbone.0.bias'"):
        load_pytorch_netvlad(bad)
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"state_dict": {}, "extra": Path("x")}, unsafe)   # arbitrary objects are refused (weights_only)
    with pytest.raises(ValueError, match="plain tensors"):
        load_pytorch_netvlad(unsafe)
    not_mat = tmp_path / "x.mat"
    scipy.io.savemat(not_mat, {"something": np.zeros(3)})
    with pytest.raises(ValueError, match="MatConvNet"):
        load_matconvnet(not_mat)
    assert weights_main(["info", str(not_mat)]) == 1


def test_imagenet_lite0_weights_load_strictly():
    weights = imagenet_lite0_weights()
    assert len(weights) == 296
    model = EfficientNetLite0()
    model.load_state_dict(weights, strict=True)
    with torch.no_grad():
        x = torch.nn.functional.relu6(model._bn0(model._conv_stem(torch.zeros(1, 3, 224, 224))))
        for block in model.eval()._blocks:
            x = block(x)
        logits = model._fc(torch.nn.functional.relu6(model._bn1(model._conv_head(x))).mean(dim=(2, 3)))
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


def small_model(seed=0):
    torch.manual_seed(seed)
    config = DescriptorConfig(name="tiny", backbone="efficientnet_lite0", backbone_block=2, local_dim=24,
                              clusters=4, whiten_dim=None, input_scale=1.0, mean=(0.5,) * 3, std=(0.5,) * 3,
                              max_side=64)
    model = GlobalDescriptor(config)
    torch.nn.init.normal_(model.netvlad.assign.weight)
    torch.nn.init.normal_(model.netvlad.centres, std=0.1)
    return model


def write_images(folder, count, size=(48, 64), seed=0):
    import cv2

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for i in range(count):
        h, w = size if i % 3 else (size[0] + 8, size[1])      # two sizes: batched separately
        path = folder / f"im{i:02d}.png"
        cv2.imwrite(str(path), rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        items.append((f"im{i:02d}", str(path)))
    return items


def test_batch_size_does_not_change_descriptors(tmp_path):
    items = write_images(tmp_path / "imgs", 10)
    model = small_model()
    one = DescriptorExtractor(model, "cpu", batch_size=1).describe_files(items)
    eight = DescriptorExtractor(model, "cpu", batch_size=8).describe_files(items)
    order = [eight.keys.index(k) for k in one.keys]
    assert sorted(one.keys) == [k for k, _ in items]
    assert np.allclose(one.descriptors, eight.descriptors[order], atol=1e-5)
    from vpr_rerank_ros.images import read_rgb

    arrays = DescriptorExtractor(model, "cpu", batch_size=4).describe_arrays([read_rgb(p) for _, p in items])
    assert np.allclose(arrays[[int(k[2:]) for k in one.keys]], one.descriptors, atol=1e-5)


def test_unreadable_images_are_skipped_and_store_resumes(tmp_path):
    items = write_images(tmp_path / "imgs", 6)
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not an image")
    items.append(("broken", str(tmp_path / "imgs" / "broken.jpg")))
    model = small_model()
    extractor = DescriptorExtractor(model, "cpu", batch_size=4)
    with DescriptorStore(tmp_path / "d.h5", model.identity, model.output_dim) as store:
        first = extractor.describe_files(items[:3], store=store)
    assert len(first.keys) == 3
    with DescriptorStore(tmp_path / "d.h5", model.identity, model.output_dim) as store:
        second = extractor.describe_files(items, store=store)
        keys, descriptors = store.read()
    assert sorted(second.keys) == ["im03", "im04", "im05"]          # the first three were not described again
    assert "broken" in second.failed and "not a decodable image" in second.failed["broken"]
    assert sorted(keys) == [f"im{i:02d}" for i in range(6)] and descriptors.shape == (6, model.output_dim)
    with pytest.raises(ValueError, match="another model"):
        DescriptorStore(tmp_path / "d.h5", small_model(seed=1).identity, model.output_dim)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_extraction_matches_cpu(tmp_path):
    items = write_images(tmp_path / "imgs", 4)
    cpu = DescriptorExtractor(small_model(), "cpu").describe_files(items)
    gpu = DescriptorExtractor(small_model(), "cuda", fp16=False).describe_files(items)
    assert np.allclose(cpu.descriptors, gpu.descriptors, atol=1e-4)


def test_sharded_description_over_two_processes_merges_into_one_file_and_resumes(tmp_path, capsys):
    """`vpr-map describe` under torchrun (2 CPU processes, gloo): each rank describes its shard, rank 0 merges;
    the file equals the one-process file. A job killed midway resumes from its part, keeping what it holds."""
    items = write_images(tmp_path / "imgs", 9)
    model = small_model()
    save_model(model, tmp_path / "tiny.safetensors")
    args = ["describe", "--images", str(tmp_path / "imgs"), "--model", str(tmp_path / "tiny.safetensors"),
            "--device", "cpu"]
    keys = [key for key, _ in items]
    assert map_main([*args, "--out", str(tmp_path / "one.h5")]) == 0
    one, identity = read_descriptors(tmp_path / "one.h5", keys)
    assert identity == model.identity and not (tmp_path / "one.h5.parts").exists()
    vpr_map = Path(sys.executable).with_name("vpr-map")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(vpr_map), *args, "--out", str(tmp_path / "two.h5")],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "descriptors of 9 images by 2 process(es)" in two.stdout
    assert np.allclose(read_descriptors(tmp_path / "two.h5", keys)[0], one, atol=1e-5)
    assert not (tmp_path / "two.h5.parts").exists()
    with h5py.File(tmp_path / "two.h5") as merged:
        assert sorted(merged["keys"].asstr()[:]) == sorted(keys)             # each image once
    # A killed one-process job: its part already holds im04 (here with a marker row, to see it is kept).
    marker = np.zeros((1, model.output_dim), np.float32)
    marker[0, 0] = 1.0
    parts_folder(tmp_path / "three.h5").mkdir()
    with DescriptorStore(parts_folder(tmp_path / "three.h5") / "rank-0-of-1.h5", model.identity,
                         model.output_dim) as part:
        part.append(["im04"], marker)
    (tmp_path / "three.h5.partial").write_bytes(b"half a merge")
    assert map_main([*args, "--out", str(tmp_path / "three.h5")]) == 0
    three, _ = read_descriptors(tmp_path / "three.h5", keys)
    assert np.array_equal(three[4], marker[0]) and np.allclose(np.delete(three, 4, 0), np.delete(one, 4, 0), atol=1e-6)
    assert map_main([*args, "--out", str(tmp_path / "three.h5")]) == 1
    assert "three.h5 exists: it is a complete descriptor file" in capsys.readouterr().err
