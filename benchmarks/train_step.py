"""Training throughput at the thesis sizes, for estimating a Mapillary SLS run (training/README.md): seconds per
optimiser step of 32 queries (forward, quantized-AP loss, backward, Adam) for step 1 (FC1, K = 255) and step 2
(GNN with positional affinity, FC1 frozen, K = 319, L = 127, width 768, 12 heads), on the CPU (and CUDA with
bfloat16 autocast when present), and the process's peak resident memory. Inputs are random unit descriptors
and overlaps: the work per step does not depend on their values. Also prints the epoch time this implies for
the ~510 k training queries of MSLS (thesis Table 3.1, before filtering)."""
from __future__ import annotations

import resource

import torch
import torch.nn.functional as F
from timing import median_time

from vpr_rerank_ros.rerank import RerankInputs, build_reranker
from vpr_rerank_ros.training import ap_loss

D, BATCH, MSLS_TRAIN_QUERIES = 4096, 32, 510_000
STEPS = {"fc (K=255)": ("fc", 255, {}),
         "gnn+pa (K=319, L=127)": ("gnn", 319, {"K": 319, "L": 127, "positional": True})}


def inputs(k: int, device: str) -> tuple[RerankInputs, torch.Tensor]:
    """A batch of random unit descriptors, overlaps in [0, 1] and about 10 % relevant candidates."""
    query = F.normalize(torch.randn(BATCH, D), dim=-1)
    candidates = F.normalize(torch.randn(BATCH, k, D), dim=-1)
    overlaps = torch.rand(BATCH, k, k)
    relevant = torch.rand(BATCH, k) < 0.1
    relevant[:, 0] = True
    return RerankInputs(query, candidates, None, overlaps).to(device), relevant.to(device)


def seconds_per_step(name: str, k: int, params: dict, device: str, repeat: int) -> float:
    torch.manual_seed(0)
    model = build_reranker(name, dim=D, **params).to(device).train()
    if name == "gnn":
        model.fc1.requires_grad_(False)
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch, relevant = inputs(k, device)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=device == "cuda")

    def step() -> None:
        with autocast:
            scores = model(batch)
        loss = ap_loss(scores.float(), relevant)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return median_time(step, repeat)


def main() -> None:
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads; D = {D}, batch {BATCH} queries")
    for device in devices:
        for label, (name, k, params) in STEPS.items():
            seconds = seconds_per_step(name, k, params, device, repeat=5 if device == "cpu" else 20)
            epoch_h = seconds * MSLS_TRAIN_QUERIES / BATCH / 3600
            print(f"{device:5s} {label:24s} {seconds * 1e3:8.0f} ms/step  -> one MSLS epoch "
                  f"({MSLS_TRAIN_QUERIES} queries) ≈ {epoch_h:6.1f} h on one {device} device")
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak resident memory of this process: {peak_gib:.2f} GiB")
    if torch.cuda.is_available():
        print(f"peak CUDA memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
