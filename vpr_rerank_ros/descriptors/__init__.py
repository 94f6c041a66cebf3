"""Global descriptors: NetVLAD models (VGG16 or EfficientNet-Lite0 backbones), loading them from the files
users have, and describing images.

    from vpr_rerank_ros.descriptors import DescriptorExtractor, load_model
    model = load_model("Pitts30K_struct.mat")           # .mat (hloc), .pth.tar (pytorch-NetVlad), .safetensors
    descriptors = DescriptorExtractor(model, "auto").describe_arrays([rgb])   # (1, D), L2-normalised

`fit_offline_model` fits the zero-download default on a map's own images; `DescriptorStore` /
`read_descriptors` keep descriptors in HDF5 keyed by image (docs/formats.md).
"""
from .extract import DescriptorExtractor, DescriptorStore, Extraction, pick_device, read_descriptors
from .loaders import convert, load_model
from .model import DescriptorConfig, GlobalDescriptor, load_native, save_model
from .offline import fit_offline_model

__all__ = ["DescriptorConfig", "DescriptorExtractor", "DescriptorStore", "Extraction", "GlobalDescriptor", "convert",
           "fit_offline_model", "load_model", "load_native", "pick_device", "read_descriptors", "save_model"]
