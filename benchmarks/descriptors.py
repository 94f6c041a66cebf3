"""Descriptor extraction throughput (images/s) at 640x480 on this machine: VGG16-NetVLAD (the thesis model;
random weights, same cost) and the offline EfficientNet-Lite0 NetVLAD default, on the CPU and, when present,
on CUDA (fp32 and fp16 autocast). Timings exclude JPEG decoding."""
from __future__ import annotations

import time

import torch

from vpr_rerank_ros.descriptors.backbones import imagenet_lite0_weights
from vpr_rerank_ros.descriptors.model import DescriptorConfig, GlobalDescriptor
from vpr_rerank_ros.descriptors.offline import offline_config


def models() -> dict[str, GlobalDescriptor]:
    lite = GlobalDescriptor(offline_config())
    tensors = lite.weight_tensors()
    tensors.update({f"backbone.{k}": v for k, v in imagenet_lite0_weights().items() if "num_batches" not in k})
    lite.load_weights(tensors, "ImageNet")
    vgg = GlobalDescriptor(DescriptorConfig())
    return {f"VGG16-NetVLAD ({dimensions(vgg)})": vgg, f"EfficientNet-Lite0 NetVLAD offline ({dimensions(lite)})": lite}


def dimensions(model: GlobalDescriptor) -> str:
    """'NetVLAD size->output size', e.g. '32768->4096'."""
    return f"{model.config.clusters * model.config.local_dim}->{model.output_dim}"


def throughput(model: GlobalDescriptor, device: str, batch: int, fp16: bool, seconds: float = 8.0) -> float:
    model = model.to(device).eval()
    x = torch.rand(batch, 3, 480, 640, device=device)
    with torch.no_grad(), torch.autocast(device, dtype=torch.float16, enabled=fp16):
        model(x)
        if device == "cuda":
            torch.cuda.synchronize()
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            model(x)
            count += batch
        if device == "cuda":
            torch.cuda.synchronize()
    return count / (time.perf_counter() - start)


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, CUDA: {torch.cuda.is_available()}")
    for name, model in models().items():
        print(f"{name}: CPU batch 4: {throughput(model, 'cpu', 4, False):.2f} images/s")
        if torch.cuda.is_available():
            for fp16 in (False, True):
                rate = throughput(model, "cuda", 16, fp16)
                print(f"{name}: {torch.cuda.get_device_name()} batch 16 {'fp16' if fp16 else 'fp32'}: {rate:.1f} images/s")


if __name__ == "__main__":
    main()
