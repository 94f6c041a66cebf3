"""ONNX export of the descriptor model and of the learned re-rankers, and the localizer's onnxruntime
descriptor backend (docs/deployment.md).

Exported with torch's TorchScript exporter (`torch.onnx.export(dynamo=False)`, opset 17): it needs no
onnxscript, and in one hand-timed try on the 2-core CPU it traced the offline model far faster than the
torch.export-based exporter, which also needs an example batch of at least 2. Tracing turns Python-level checks on shapes into constants;
the graphs are checked against torch at other image sizes, batches and K in test/test_onnx.py.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .checkpoint import staged
from .descriptors.extract import DescriptorExtractor
from .descriptors.loaders import load_model
from .descriptors.model import GlobalDescriptor
from .rerank.inputs import RerankInputs
from .rerank.learned import RERANKER_FORMAT, GnnConfig, LearnedReranker, load_reranker

OPSET = 17
EXAMPLE_SIZE = (240, 320)          # (height, width) of the traced example image; the graph takes any size
PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")  # "auto"


def export_descriptor(model: GlobalDescriptor, path: str | Path, size: tuple[int, int] = EXAMPLE_SIZE) -> Path:
    """Write the descriptor network as ONNX: `images` (B, 3, H, W) float32 RGB in [0, 1] -> `descriptors`
    (B, D), B, H and W dynamic. The normalisation (input_scale, mean, std) is in the graph; the caller does
    what `prepare_image` does: RGB order, longer side resized down to max_side, division by 255."""
    device = next(model.parameters()).device
    example = torch.rand(1, 3, *size, device=device)
    metadata = {"kind": "descriptor", "identity": model.identity, "config": model.config.to_json(),
                "output_dim": str(model.output_dim)}
    return _export(model.eval(), (example,), path, {"images": {0: "batch", 2: "height", 3: "width"}},
                   {"descriptors": {0: "batch"}}, metadata)


def reranker_input_names(config: GnnConfig) -> list[str]:
    """The graph inputs of a re-ranker, in order: query (B, D) and candidates (B, K, D) float32; with
    positional affinity overlaps (B, K, K) float32; with heading poses (B, K, 3) and query_heading (B,)
    float64 (NaN = unknown). Names and meanings are those of RerankInputs."""
    names = ["query", "candidates"]
    if config.variant != "fc" and config.positional:
        names.append("overlaps")
    if config.variant != "fc" and config.heading:
        names += ["poses", "query_heading"]
    return names


class _Scoring(nn.Module):
    """A learned re-ranker's uncached scoring function (no map cache of FC1 embeddings) on plain tensors."""

    def __init__(self, reranker: LearnedReranker) -> None:
        super().__init__()
        self.reranker, self.names = reranker, reranker_input_names(reranker.config)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.reranker.score(RerankInputs(**dict(zip(self.names, tensors))))


def export_reranker(reranker: LearnedReranker, path: str | Path) -> Path:
    """Write a learned re-ranker's scoring function as ONNX: the inputs of `reranker_input_names` -> `scores`
    (B, K), higher is better. B and K are dynamic (K >= L for gnn and csa). Traced on a batch of 2 at the
    model's K, so that the graph takes the batched path (`refine`'s single-graph shortcut is a Python branch
    that tracing would freeze)."""
    c = reranker.config
    generator = torch.Generator().manual_seed(0)
    example = {"query": torch.randn(2, c.dim, generator=generator),
               "candidates": torch.randn(2, c.K, c.dim, generator=generator),
               "overlaps": torch.rand(2, c.K, c.K, generator=generator),
               "poses": torch.rand(2, c.K, 3, generator=generator, dtype=torch.float64) * 360.0,
               "query_heading": torch.rand(2, generator=generator, dtype=torch.float64) * 360.0}
    names = reranker_input_names(c)
    device = next(reranker.parameters()).device
    axes = {"query": {0: "batch"}, "candidates": {0: "batch", 1: "K"}, "overlaps": {0: "batch", 1: "K", 2: "K"},
            "poses": {0: "batch", 1: "K"}, "query_heading": {0: "batch"}}
    metadata = {"kind": "reranker", "config": json.dumps({"format": RERANKER_FORMAT, **asdict(c)}, sort_keys=True)}
    return _export(_Scoring(reranker).eval(), tuple(example[n].to(device) for n in names), path,
                   {n: axes[n] for n in names}, {"scores": {0: "batch", 1: "K"}}, metadata)


def export_checkpoint(weights: str | Path, path: str | Path, size: tuple[int, int] = EXAMPLE_SIZE) -> tuple[str, Path]:
    """Export a file as the CLI gets it: a learned re-ranker checkpoint (told by its JSON's format) or
    descriptor weights in any format `load_model` reads. Returns (kind, path written)."""
    config = Path(weights).with_suffix(".json")
    if Path(weights).suffix == ".safetensors" and config.is_file() and \
            json.loads(config.read_text()).get("format") == RERANKER_FORMAT:
        return "reranker", export_reranker(load_reranker(weights), path)
    return "descriptor", export_descriptor(load_model(weights), path, size)


def _export(module: nn.Module, args: tuple, path: str | Path, input_axes: dict, output_axes: dict,
            metadata: dict[str, str]) -> Path:
    """Trace `module` on `args` into `path` with dynamic axes and `vpr_rerank_ros.*` metadata; the file is
    written beside its name and renamed into place, so a killed export never leaves half a model."""
    import onnx

    path, partial = staged(path, ".onnx", "ONNX files")
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter's deprecation notice, and the tracer's notes on shape checks turned constant.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(module, args, str(partial), dynamo=False, opset_version=OPSET,
                          input_names=list(input_axes), output_names=list(output_axes),
                          dynamic_axes={**input_axes, **output_axes})
        shape = module(*args).shape
    graph = onnx.load(str(partial))
    # The output's fixed axes (the descriptor dimension), which shape inference leaves symbolic after the L2.
    for axis, dim in enumerate(graph.graph.output[0].type.tensor_type.shape.dim):
        if axis not in output_axes[graph.graph.output[0].name]:
            dim.dim_value = shape[axis]
    onnx.helper.set_model_props(graph, {f"vpr_rerank_ros.{k}": v for k, v in metadata.items()})
    onnx.save(graph, str(partial))
    os.replace(partial, path)
    return path


def graph_signature(path: str | Path) -> dict[str, list]:
    """{name: shape} of a graph's inputs and outputs, a dynamic axis by its name ('batch', 'height', ...)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}


def execution_providers(spec: str) -> list[str]:
    """onnxruntime execution providers from a setting: 'auto' = those of TensorRT, CUDA and CPU this
    onnxruntime build has, in that order; else a comma-separated list of provider names, all available."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if spec.strip() == "auto":
        return [p for p in PROVIDER_PREFERENCE if p in available]
    names = [name.strip() for name in spec.split(",") if name.strip()]
    missing = [name for name in names if name not in available]
    if missing or not names:
        raise ValueError(f"onnx_providers: {', '.join(missing) or 'none given'} not available in this onnxruntime "
                         f"(it has {', '.join(available)}; or give auto)")
    return names


def cached_export(model: GlobalDescriptor) -> Path:
    """The model's ONNX export in the user's cache ($XDG_CACHE_HOME or ~/.cache, vpr_rerank_ros/onnx), named by
    its identity: exported at the first start with this model, reused by later ones."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vpr_rerank_ros" / "onnx"
    path = root / f"{model.identity[:16]}-opset{OPSET}.onnx"
    return path if path.is_file() else export_descriptor(model, path)


class OnnxDescriptorExtractor(DescriptorExtractor):
    """A DescriptorExtractor whose network runs in onnxruntime: images are prepared as for torch, and the graph
    must be an export of `model` itself (same identity), so its descriptors fit the map `model` fits."""

    def __init__(self, model: GlobalDescriptor, path: str | Path | None = None,
                 providers: str = "CPUExecutionProvider", batch_size: int = 8) -> None:
        import onnxruntime as ort

        super().__init__(model, "cpu", batch_size)
        self.path = Path(path) if path else cached_export(model)
        self.providers = execution_providers(providers)
        try:
            self.session = ort.InferenceSession(str(self.path), providers=self.providers)
        except Exception as exc:   # onnxruntime's own error types derive from Exception only
            raise ValueError(f"{self.path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from exc
        stated = self.session.get_modelmeta().custom_metadata_map.get("vpr_rerank_ros.identity")
        if stated != model.identity:
            raise ValueError(f"{self.path}: exported from descriptor model {str(stated)[:12]}, not from "
                             f"{model.config.name} ({model.identity[:12]}) that this map uses: export that one "
                             "(vpr-weights export-onnx)")

    def run(self, batch: torch.Tensor, head=None) -> np.ndarray:
        """(B, 3, H, W) in [0, 1] -> (B, D) float32 through the ONNX graph (the whole model only)."""
        if head is not None:
            raise ValueError("the onnxruntime backend runs the exported model only, not a custom head")
        return self.session.run(None, {"images": batch.numpy()})[0]
