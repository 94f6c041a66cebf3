"""Run by test_training under torchrun (or alone, for the one-process reference): trains the fc and gnn
re-rankers on planted-cluster candidate sets into OUT/fc and OUT/gnn. Each rank builds its own copy of the data."""
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_training import planted_clusters  # noqa: E402

from vpr_rerank_ros.rerank import build_reranker  # noqa: E402
from vpr_rerank_ros.training import TrainSettings, train  # noqa: E402

out = Path(sys.argv[1])
data = out / f"data{os.environ.get('RANK', '0')}"
train_set, val_set = planted_clusters(data, 70, seed=5), planted_clusters(data, 20, seed=6)
settings = TrainSettings(epochs=2, K=30, lr=1e-3, batch_size=16)
torch.manual_seed(0)
models = {"fc": build_reranker("fc", dim=32, hidden=16),
          "gnn": build_reranker("gnn", dim=32, hidden=16, K=30, L=10, width=32, heads=4, mlp=64, dropout=0.0)}
for name, model in models.items():
    train(model, [train_set], [val_set], settings, out / name, log=print, allow_worse=True)
