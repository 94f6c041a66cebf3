"""The thesis GNN and its ablations: architecture (parameter counts), positional and heading affinities,
checkpoints, batching, dtypes."""
import pytest
import torch
import torch.nn.functional as F

from vpr_rerank_ros.geo import fov_overlap
from vpr_rerank_ros.rerank import RerankInputs, build_reranker, load_reranker, save_reranker
from vpr_rerank_ros.rerank.learned import count_summary, parameter_count


@pytest.mark.parametrize("layers, millions", [(1, 9.38), (2, 16.46), (3, 23.55)])
def test_parameter_counts_match_the_thesis(layers, millions):
    model = build_reranker("gnn", layers=layers)               # D = 4096, L = 127, positional affinity
    assert parameter_count(model) == pytest.approx(millions * 1e6, rel=2e-3)
    assert parameter_count(model.fc1) == 4096 * 512 + 512     # 2.10 M
    assert model.fc2.in_features == 255
    assert count_summary(model).startswith(f"{millions:.2f} M")
    assert build_reranker("gnn", positional=False).fc2.in_features == 128


def small(name="gnn", **params):
    torch.manual_seed(0)
    defaults = dict(dim=32, hidden=16, K=12, L=5, width=24, heads=4, mlp=48, layers=2, dropout=0.0)
    if name == "fc":
        defaults = dict(dim=32, hidden=16)
    return build_reranker(name, **{**defaults, **params})


def inputs(b=3, k=12, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=g), dim=1)
    c = F.normalize(torch.randn(b, k, d, generator=g), dim=2)
    poses = torch.cat([torch.rand(b, k, 2, generator=g, dtype=torch.float64) * 80 + 386000,
                       torch.rand(b, k, 1, generator=g, dtype=torch.float64) * 360], dim=2)
    return q, c, poses


def test_node_features_are_visual_then_positional_affinities():
    model = small()
    q, c, poses = inputs()
    feats = model.node_features(RerankInputs(q, c, poses))
    assert feats.shape == (3, 13, 6 + 5)
    nodes = model.embed(torch.cat([q[:, None], c], 1))
    assert torch.allclose(feats[..., :6], nodes @ nodes[:, :6].transpose(1, 2), atol=1e-6)
    assert torch.allclose(feats[:, 0, 6:], torch.zeros(3, 5))                   # the query's position is unknown
    expected = fov_overlap(poses[:, :, None], poses[:, None, :5]).float()
    assert torch.allclose(feats[:, 1:, 6:], expected, atol=1e-6)
    assert torch.allclose(torch.diagonal(feats[:, 1:6, 6:], dim1=1, dim2=2), torch.ones(3, 5), atol=1e-6)
    # The map's precomputed overlaps give the same features.
    overlaps = fov_overlap(poses[:, :, None], poses[:, None, :]).float()
    assert torch.allclose(model.node_features(RerankInputs(q, c, None, overlaps)), feats, atol=1e-6)
    with pytest.raises(ValueError, match="poses or their overlaps"):
        model(RerankInputs(q, c))
    with pytest.raises(ValueError, match="at least L = 5"):
        model(RerankInputs(q, c[:, :4], poses[:, :4]))


def test_scores_are_cosines_of_refined_nodes_and_batching_is_exact():
    model = small()
    q, c, poses = inputs()
    scores = model(RerankInputs(q, c, poses))
    refined = model.refine(RerankInputs(q, c, poses))
    assert torch.allclose(scores, torch.einsum("bd,bkd->bk", refined[:, 0], refined[:, 1:]), atol=1e-6)
    assert torch.allclose(refined.norm(dim=-1), torch.ones(3, 13), atol=1e-5)
    for b in range(3):
        assert torch.allclose(model(RerankInputs(q[b:b + 1], c[b:b + 1], poses[b:b + 1]))[0], scores[b], atol=1e-5)
    # The positional affinity matters: moving the candidates changes the scores.
    moved = poses.clone()
    moved[..., 2] = (moved[..., 2] + 90) % 360
    assert not torch.allclose(model(RerankInputs(q, c, moved)), scores, atol=1e-4)


def test_heading_affinity():
    model = small(heading=True)
    q, c, poses = inputs()
    heading = torch.tensor([poses[0, 0, 2].item(), float("nan"), 0.0])
    feats = model.node_features(RerankInputs(q, c, poses, query_heading=heading))
    assert feats.shape[-1] == 6 + 5 + 1
    assert feats[0, 1, -1].item() == pytest.approx(1.0) and feats[0, 0, -1].item() == pytest.approx(1.0)
    assert torch.allclose(feats[1, :, -1], torch.full((13,), 0.5))                # unknown query heading
    opposite = (1 + torch.cos(torch.deg2rad(0.0 - poses[2, :, 2]))) / 2
    assert torch.allclose(feats[2, 1:, -1], opposite.float(), atol=1e-6)
    # The model's scores follow the query heading it is given.
    turned = model(RerankInputs(q, c, poses, query_heading=heading + torch.tensor([90.0, 0.0, 180.0])))
    scores = model(RerankInputs(q, c, poses, query_heading=heading))
    assert not torch.allclose(turned[0], scores[0], atol=1e-4) and not torch.allclose(turned[2], scores[2], atol=1e-4)
    assert torch.equal(turned[1], scores[1])                                      # NaN + 0: still unknown


def test_fc_and_csa_variants():
    q, c, _ = inputs()
    fc = small("fc")
    assert torch.allclose(fc(RerankInputs(q, c)), torch.einsum("bd,bkd->bk", fc.embed(q), fc.embed(c)), atol=1e-6)
    csa = small("csa", positional=False, dim=32)
    assert csa.fc1 is None and csa.head[-1].out_features == 6
    assert csa(RerankInputs(q, c)).shape == (3, 12)


def test_checkpoints_round_trip_and_refuse_mismatches(tmp_path):
    model = small()
    path = save_reranker(model, tmp_path / "gnn.safetensors")
    loaded = load_reranker(path)
    q, c, poses = inputs()
    assert loaded.trained and not model.trained
    assert torch.equal(loaded(RerankInputs(q, c, poses)), model(RerankInputs(q, c, poses)))
    assert torch.equal(build_reranker("gnn", weights=path, layers=2)(RerankInputs(q, c, poses)), model(RerankInputs(q, c, poses)))
    with pytest.raises(ValueError, match="layers requested 3, stored 2"):
        build_reranker("gnn", weights=path, layers=3)
    with pytest.raises(ValueError, match="variant requested 'fc', stored 'gnn'"):
        build_reranker("fc", weights=path)
    path.with_suffix(".json").unlink()
    with pytest.raises(FileNotFoundError, match="JSON config"):
        load_reranker(path)


def test_attention_is_torch_multihead_attention():
    model = small()
    mine = model.layers[0].attention
    reference = torch.nn.MultiheadAttention(24, 4, batch_first=True)
    reference.load_state_dict(mine.state_dict())
    x = torch.randn(2, 7, 24)
    assert torch.allclose(mine(x), reference(x, x, x, need_weights=False)[0], atol=1e-6)


def test_inference_shortcuts_are_exact_and_follow_weight_changes():
    """Without autograd the first projection is folded into FC2, map candidates come from the attached FC1
    cache and a single graph runs channel-major: same scores as the plain path, also after the weights change."""
    for name in ("gnn", "fc"):
        model = small(name)
        q, c, poses = inputs()
        map_descriptors = c.reshape(-1, 32)
        ids = torch.arange(36).reshape(3, 12)
        plain = model(RerankInputs(q, c, poses))                                   # autograd on: no shortcut taken
        model.attach_map(map_descriptors.numpy())
        with torch.inference_mode():
            assert torch.allclose(model(RerankInputs(q, c, poses, ids=ids)), plain, atol=1e-5)
            for b in range(3):
                assert torch.allclose(model(RerankInputs(q[b:b + 1], c[b:b + 1], poses[b:b + 1], ids=ids[b:b + 1]))[0], plain[b],
                                      atol=1e-5)
            wrong_rows = model(RerankInputs(q, c, poses, ids=ids.flip(1)))          # proves the cache is what gets used
        assert not torch.allclose(wrong_rows, plain, atol=1e-3)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))                    # in place, like an optimiser step
        changed = model(RerankInputs(q, c, poses))
        with torch.inference_mode():
            assert torch.allclose(model(RerankInputs(q, c, poses, ids=ids)), changed, atol=1e-5)
        assert not torch.allclose(changed, plain, atol=1e-3)


@pytest.mark.parametrize("name", ["gnn", "fc", "csa"])
def test_float16(name):
    model = small(name, **({} if name == "fc" else {"positional": name == "gnn"}))
    q, c, poses = inputs()
    full = model(RerankInputs(q, c, poses))
    half = model.half()(RerankInputs(q.half(), c.half(), poses))
    assert half.dtype == torch.float16 and torch.allclose(half.float(), full, atol=3e-2)
    with torch.inference_mode():                                     # the inference paths, batched and single
        assert torch.allclose(model(RerankInputs(q.half(), c.half(), poses)).float(), full, atol=3e-2)
        assert torch.allclose(model(RerankInputs(q[:1].half(), c[:1].half(), poses[:1]))[0].float(), full[0], atol=3e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_equals_cpu():
    model = small()
    q, c, poses = inputs()
    cpu = model(RerankInputs(q, c, poses))
    model = model.cuda()
    gpu = model(RerankInputs(q.cuda(), c.cuda(), poses.cuda()))
    assert torch.allclose(cpu, gpu.cpu(), atol=1e-4)
    model.attach_map(c.reshape(-1, 32).numpy())                      # the inference shortcuts on CUDA
    with torch.inference_mode():
        fast = model(RerankInputs(q.cuda(), c.cuda(), poses.cuda(), ids=torch.arange(36).reshape(3, 12).cuda()))
        single = model(RerankInputs(q[:1].cuda(), c[:1].cuda(), poses[:1].cuda(), ids=torch.arange(12)[None].cuda()))
    assert torch.allclose(cpu, fast.cpu(), atol=1e-4) and torch.allclose(cpu[:1], single.cpu(), atol=1e-4)
