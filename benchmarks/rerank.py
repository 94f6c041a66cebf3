"""Per-query re-ranking latency at the thesis sizes (K = 319 candidates + the query = 320 nodes, L = 127
anchors + the query = 128, D = 4096) for every re-ranker, batch 1 and batch 32, on the CPU (and CUDA when
present), as the localizer runs them: candidates come from a 2000-image map the re-ranker is attached to
(learned models then look up cached FC1 embeddings), overlaps from the map's overlap graph for the
re-rankers that use geometry (timed with them). The GNN also
runs without the map cache, for comparison (the positional affinity itself: benchmarks/geometry.py). Then, side by side on the same
descriptors (one query, batch 1, D = 4096): k-reciprocal against the authors' re_ranking (reference_rerankers.py,
timed on its precomputed distance matrices, so the Gram product is ours alone to pay) at 120 and 320
candidates, and SuperGlobal at K = 320 against one (K x D)(D x K) product, its own floor."""
from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F

from reference_rerankers import distance_matrices, re_ranking
from timing import best_time
from vpr_rerank_ros.geo import OverlapGraph
from vpr_rerank_ros.rerank import COMPARED, RerankInputs, build_reranker, rerank_order, reranker_label

K, L, D = 319, 127, 4096
MAP_SIZE = 2000
RERANKERS = [*COMPARED, ("fc", {}), ("gnn", {"layers": 1}), ("gnn", {"layers": 1, "positional": False}),
             ("gnn", {"layers": 2})]
UNCACHED = ("gnn", {"layers": 1})   # also timed without the map's FC1 cache


def main() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; K={K} candidates, L={L}, D={D}")
    map_poses = np.concatenate([rng.uniform(0, 300, (MAP_SIZE, 2)) + [386000.0, 6174000.0],
                                rng.uniform(0, 360, (MAP_SIZE, 1))], axis=1)
    map_descriptors = F.normalize(torch.randn(MAP_SIZE, D), dim=1).numpy()
    graph = OverlapGraph.build(map_poses)
    for device in devices:
        for b in (1, 32):
            q = F.normalize(torch.randn(b, D), dim=1).to(device)
            ids = np.stack([rng.choice(MAP_SIZE, K, replace=False) for _ in range(b)])
            c = torch.from_numpy(map_descriptors[ids]).to(device)
            poses = torch.from_numpy(map_poses[ids]).to(device)
            for name, params, cached in [(n, p, True) for n, p in RERANKERS] + [(*UNCACHED, False)]:
                reranker = build_reranker(name, **params).to(device).eval()
                if cached:
                    reranker.attach_map(map_descriptors)
                rows = torch.from_numpy(ids).to(device) if cached else None

                def run():
                    with torch.inference_mode():
                        overlaps = None
                        if reranker.uses_geometry:
                            overlaps = torch.from_numpy(graph.lookup_batch(ids)).to(device)
                        reranker(RerankInputs(q, c, poses, overlaps, ids=rows))
                        if device == "cuda":
                            torch.cuda.synchronize()

                per_query = best_time(run, 3 if b == 32 else 10) / b
                label = reranker_label(name, params) + ("" if cached else " (no map cache)")
                print(f"{device} batch {b:2d}  {label:40s} {per_query * 1e3:8.2f} ms/query")
    against_references()


def against_references() -> None:
    """k-reciprocal vs the reference re_ranking (target >= 20x faster, same order) and SuperGlobal vs one K x K
    similarity product (target <= 1.5x), each pair timed side by side on the same CPU data."""
    g = torch.Generator().manual_seed(0)
    k_reciprocal, superglobal = build_reranker("k_reciprocal").eval(), build_reranker("superglobal").eval()
    for k in (120, 320):
        inputs = RerankInputs(F.normalize(torch.randn(1, D, generator=g), dim=1),
                              F.normalize(torch.randn(1, k, D, generator=g), dim=2))
        distances = distance_matrices(inputs.query.numpy(), inputs.candidates[0].numpy())
        with torch.inference_mode():
            t_ours = best_time(lambda: k_reciprocal(inputs), 50)
            ours = rerank_order(k_reciprocal(inputs))[0].numpy()
        same = np.array_equal(ours, np.argsort(re_ranking(*distances)[0], kind="stable"))
        t_reference = best_time(lambda: re_ranking(*distances), 10)
        print(f"k_reciprocal, {k} candidates: {t_ours * 1e3:.2f} ms, reference re_ranking {t_reference * 1e3:.1f} ms "
              f"-> {t_reference / t_ours:.1f}x faster, target >= 20x {'met' if t_reference >= 20 * t_ours else 'NOT met'}; "
              f"orders identical: {same}")
        if k == 320:
            c = inputs.candidates[0]
            with torch.inference_mode():
                t_superglobal = best_time(lambda: superglobal(inputs), 50)
                t_product = best_time(lambda: torch.matmul(c, c.T), 50)
            print(f"superglobal, K={k}, D={D}, batch 1: {t_superglobal * 1e3:.2f} ms, one (KxD)(DxK) product "
                  f"{t_product * 1e3:.2f} ms -> {t_superglobal / t_product:.2f}x, target <= 1.5x "
                  f"{'met' if t_superglobal <= 1.5 * t_product else 'NOT met'}")


if __name__ == "__main__":
    main()
