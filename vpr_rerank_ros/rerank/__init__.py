"""Re-ranking: what a re-ranker receives (`RerankInputs`, built from a map by `rerank_inputs`), the re-rankers
by name (`available_rerankers`, `build_reranker`), and the learned models' checkpoints.

    from vpr_rerank_ros.rerank import build_reranker, rerank_inputs, rerank_order
    reranker = build_reranker("superglobal", P=1, beta=0.6)
    scores = reranker(rerank_inputs(bundle, query_descriptors, candidate_ids))   # (B, K), higher is better

Training-free: none, aqe, alpha_qe, superglobal (classic.py); k_reciprocal, gnn_knn (neighbours.py).
Learned (need weights=PATH of a checkpoint): gnn, fc, csa (learned.py). docs/reranking.md describes each.
"""
from .base import Reranker, rerank_order, reranker_label
from .inputs import RerankInputs, rerank_inputs
from .learned import GnnConfig, LearnedReranker, load_reranker, save_reranker
from .registry import (COMPARED, available_rerankers, build_reranker, register, reranker_class,
                       reranker_defaults)

__all__ = ["COMPARED", "GnnConfig", "LearnedReranker", "Reranker", "RerankInputs", "available_rerankers",
           "build_reranker", "load_reranker", "register", "rerank_inputs", "rerank_order", "reranker_class",
           "reranker_defaults", "reranker_label", "save_reranker"]
