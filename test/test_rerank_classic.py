"""Training-free re-rankers: hand-checkable cases and slow, obviously-correct references written from the
equations (loops are fine here), batching, dtypes and devices. k-reciprocal's reference is the one the
benchmark times (benchmarks/reference_rerankers.py, loaded by its path: benchmarks/ is not a package)."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vpr_rerank_ros.rerank import (RerankInputs, Reranker, build_reranker, register, rerank_order, reranker_class,
                                   reranker_defaults, save_reranker)

_spec = importlib.util.spec_from_file_location(
    "reference_rerankers", Path(__file__).resolve().parents[1] / "benchmarks" / "reference_rerankers.py")
REFERENCE = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(REFERENCE)


def unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def retrieval_batch(b=3, k=30, d=16, seed=0):
    """Queries and their candidates sorted by similarity, like a real retrieval."""
    q, c = unit(b, d, seed=seed), unit(b, k, d, seed=seed + 1)
    order = torch.argsort(torch.einsum("bd,bkd->bk", q, c), dim=1, descending=True)
    return q, torch.gather(c, 1, order.unsqueeze(-1).expand(-1, -1, d))


def test_registry_and_errors():
    with pytest.raises(ValueError, match="unknown re-ranker 'fancy'"):
        build_reranker("fancy")
    with pytest.raises(ValueError, match="has no parameter 'kk'; it takes: k"):
        build_reranker("aqe", kk=3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        build_reranker("aqe", k=0)
    r = build_reranker("none")
    with pytest.raises(ValueError, match=r"query \(B, D\)"):
        r(RerankInputs(torch.zeros(2, 4), torch.zeros(3, 5, 4)))
    with pytest.raises(ValueError, match="poses"):
        r(RerankInputs(torch.zeros(2, 4), torch.zeros(2, 5, 4), poses=torch.zeros(2, 5, 2)))
    with pytest.raises(TypeError, match="takes RerankInputs"):
        r(torch.zeros(2, 4))


def test_the_registry_is_complete_whatever_was_imported_first():
    """A fresh interpreter that imports only the package's public entry point sees every re-ranker."""
    code = ("from vpr_rerank_ros.rerank import available_rerankers as a; "
            "print(','.join(a()), ','.join(a(learned=False)), ','.join(a(learned=True)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["none,aqe,alpha_qe,superglobal,k_reciprocal,gnn_knn,gnn,fc,csa",
                   "none,aqe,alpha_qe,superglobal,k_reciprocal,gnn_knn", "gnn,fc,csa"]
    for module in ("base", "learned", "classic"):     # importing a submodule first changes nothing
        code = f"import vpr_rerank_ros.rerank.{module}; " + code
        assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True).stdout.split() == out


def test_a_duplicate_name_is_refused_and_defaults_are_listed():
    class Other(Reranker):
        name = "aqe"

    with pytest.raises(ValueError, match="'aqe' is already registered"):
        register(Other)
    with pytest.raises(ValueError, match="own `name`"):
        register(type("Nameless", (Reranker,), {}))
    assert reranker_defaults("superglobal") == {"P": 1, "beta": 0.15}
    assert reranker_defaults("none") == {}
    assert set(reranker_defaults("gnn")) >= {"weights", "L", "positional", "heading"}
    assert reranker_class("gnn_knn").name == "gnn_knn"


def test_learned_models_name_an_unknown_parameter_even_with_weights(tmp_path):
    path = save_reranker(build_reranker("fc", dim=8, hidden=4), tmp_path / "fc.safetensors")
    with pytest.raises(ValueError, match="has no parameter 'colour'"):
        build_reranker("fc", weights=str(path), colour=1)
    with pytest.raises(ValueError, match="has no parameter 'colour'"):
        build_reranker("gnn", colour=1)


def test_none_keeps_the_order_and_sort_is_stable():
    q, c = retrieval_batch()
    assert torch.equal(rerank_order(build_reranker("none")(RerankInputs(q, c))), torch.arange(30).expand(3, -1))
    assert rerank_order(torch.tensor([[1.0, 2.0, 2.0, 0.5]])).tolist() == [[1, 2, 0, 3]]


def test_aqe_and_alpha_qe_by_hand():
    q = torch.tensor([[1.0, 0.0]])
    c = F.normalize(torch.tensor([[[0.8, 0.6], [0.0, 1.0], [0.6, -0.8]]]), dim=-1)
    aqe = build_reranker("aqe", k=1)(RerankInputs(q, c))
    expected = F.normalize(torch.tensor([1.8, 0.6]), dim=0)          # mean of q and c1, normalised
    assert torch.allclose(aqe[0], c[0] @ expected)
    alpha = build_reranker("alpha_qe", k=2, alpha=2.0)(RerankInputs(q, c))
    w = torch.tensor([0.8, 0.0]) ** 2                                 # s(q, c1)^2, s(q, c2)^2
    new = q[0] + w[0] * c[0, 0] + w[1] * c[0, 1]
    assert torch.allclose(alpha[0], c[0] @ F.normalize(new, dim=0))


def superglobal_reference(q, c, P, beta):
    """SuperGlobal for one query, step by step as the official MDescAug + RerankwMDA do it."""
    k = len(c)
    refined = []
    for i in range(k):
        sims = [float(c[i] @ c[j]) for j in range(k)]
        nearest = sorted(range(k), key=lambda j: -sims[j])[:P + 1]     # itself first
        weights = [1.0] + [beta * sims[j] for j in nearest[1:]]
        refined.append(sum(w * c[j] for w, j in zip(weights, nearest)) / sum(weights))
    first = [float(q @ r) for r in refined]
    by_first = sorted(range(k), key=lambda i: -first[i])
    refined_query = torch.stack([refined[i] for i in by_first[:P + 1]]).max(dim=0).values
    final = [(first[i] + float(refined_query @ refined[i])) / 2 for i in range(k)]
    return sorted(range(k), key=lambda i: -final[i])


@pytest.mark.parametrize("P, beta", [(1, 0.6), (2, 0.15), (4, 0.3)])
def test_superglobal_matches_the_official_procedure(P, beta):
    q, c = retrieval_batch(b=4, k=25, d=12, seed=P)
    order = rerank_order(build_reranker("superglobal", P=P, beta=beta)(RerankInputs(q, c)))
    for b in range(4):
        assert order[b].tolist() == superglobal_reference(q[b], c[b], P, beta)


@pytest.mark.parametrize("k1, k2, lam", [(20, 6, 0.3), (8, 3, 0.5), (5, 1, 0.1)])
def test_k_reciprocal_matches_the_reference_for_a_whole_gallery(k1, k2, lam):
    # Clustered data, as re-identification galleries are, so that neighbourhoods mean something.
    g = torch.Generator().manual_seed(k1)
    centres = torch.randn(6, 10, generator=g, dtype=torch.float64)
    points = F.normalize(centres[torch.arange(60) % 6] + 0.35 * torch.randn(60, 10, generator=g, dtype=torch.float64), dim=1)
    probe, gallery = points[0], points[1:]
    scores = build_reranker("k_reciprocal", k1=k1, k2=k2, lambda_value=lam)(RerankInputs(probe[None], gallery[None]))
    final = REFERENCE.re_ranking(*REFERENCE.distance_matrices(probe[None].numpy(), gallery.numpy()), k1, k2, lam)
    assert rerank_order(scores)[0].tolist() == np.argsort(final[0], kind="stable").tolist()


def gnn_knn_reference(q, c, k1, k2, alpha, layers):
    x = torch.cat([q[None], c])
    n = len(x)
    sim = x @ x.T
    rank = [sorted(range(n), key=lambda j: -float(sim[i, j])) for i in range(n)]
    a = torch.zeros(n, n, dtype=x.dtype)
    for i in range(n):
        for j in rank[i][:k1]:
            a[i, j] = 1.0
    h = (a + a.T) / 2
    for _ in range(layers):
        new = h.clone()
        for i in range(n):
            for j in rank[i][:k2]:
                new[i] += max(float(sim[i, j]), 0.0) ** alpha * h[j]
        h = F.normalize(new, dim=1)
    return torch.stack([h[0] @ h[j] for j in range(1, n)])


@pytest.mark.parametrize("k1, k2, alpha, layers", [(20, 6, 2.0, 2), (5, 3, 1.0, 1), (10, 2, 2.0, 3)])
def test_gnn_knn_matches_the_equations(k1, k2, alpha, layers):
    q, c = retrieval_batch(b=2, k=24, d=8, seed=k1)
    scores = build_reranker("gnn_knn", k1=k1, k2=k2, alpha=alpha, layers=layers)(RerankInputs(q, c))
    for b in range(2):
        assert torch.allclose(scores[b], gnn_knn_reference(q[b], c[b], k1, k2, alpha, layers), atol=1e-6)


TRAINING_FREE = [("none", {}), ("aqe", {"k": 3}), ("alpha_qe", {"k": 3, "alpha": 3.0}),
                 ("superglobal", {"P": 2, "beta": 0.3}), ("k_reciprocal", {}), ("gnn_knn", {})]


@pytest.mark.parametrize("name, params", TRAINING_FREE)
def test_batched_equals_one_by_one_and_float16_agrees(name, params):
    q, c = retrieval_batch(b=5, k=40, d=32, seed=9)
    r = build_reranker(name, **params)
    batched = r(RerankInputs(q.float(), c.float()))
    assert batched.shape == (5, 40) and batched.dtype == torch.float32
    for b in range(5):
        assert torch.allclose(batched[b], r(RerankInputs(q[b:b + 1].float(), c[b:b + 1].float()))[0], atol=1e-5)
    half = r(RerankInputs(q.half(), c.half()))
    assert half.dtype == torch.float16
    assert torch.allclose(half.float(), batched, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
@pytest.mark.parametrize("name, params", TRAINING_FREE)
def test_cuda_equals_cpu(name, params):
    q, c = retrieval_batch(b=4, k=40, d=32, seed=3)
    r = build_reranker(name, **params)
    assert torch.allclose(r(RerankInputs(q.float(), c.float())), r(RerankInputs(q.float().cuda(), c.float().cuda())).cpu(), atol=1e-4)
