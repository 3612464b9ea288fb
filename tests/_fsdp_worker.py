"""Run by tests/test_fsdp.py as ``torchrun --nproc_per_node=2 tests/_fsdp_worker.py`` (CPU, gloo).

Checks, on every rank, that off-principal training sharded with FSDP2 (and replicated with DDP) follows the
single-process trajectory, and that bases come from rank 0's weights. Exits non-zero on the first mismatch.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.distributed as dist
from torch import nn

TOL = 1e-6
STEPS = 5


class Net(nn.Module):
    """Row counts 33 and 5 split unevenly over 2 ranks (17/16 and 3/2 rows); an embedding, biases and a norm."""

    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(13, 16)
        self.fc1 = nn.Linear(16, 33)
        self.fc2 = nn.Linear(33, 16)
        self.norm = nn.LayerNorm(16)
        self.fc3 = nn.Linear(16, 5, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        x = x + self.fc2(torch.tanh(self.fc1(x)))
        return self.fc3(self.norm(x))


def build() -> Net:
    torch.manual_seed(0)
    return Net()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, 13, (8, 6), generator=gen), torch.randint(0, 5, (8, 6), generator=gen)


def loss_fn(model, ids, target):
    return nn.functional.cross_entropy(model(ids).reshape(-1, 5), target.reshape(-1))


def train(model, opt, rows=slice(None)):
    """STEPS steps on the same global batch (``rows`` of it on this rank), clipping as a Trainer would."""
    for step in range(STEPS):
        ids, target = batch(step)
        loss_fn(model, ids[rows], target[rows]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad()


def full(p: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (p.full_tensor() if isinstance(p, DTensor) else p).detach()


def compare(what: str, model, ref) -> None:
    worst = 0.0
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        diff = (full(p) - q.detach()).abs().max().item()
        worst = max(worst, diff)
        if os.environ.get("FSDP_DEBUG"):
            print(what, name, f"{diff:.1e}")
        if diff > TOL:
            raise AssertionError(f"rank {dist.get_rank()}: {what}: {name} differs from single-process by {diff:.2e}")
    if dist.get_rank() == 0:
        print(f"{what}: max |difference| to single-process training = {worst:.1e}", flush=True)


def check_leak(what, model, start, opt) -> None:
    from offprincipal.projection import principal_leak

    for name, p in model.named_parameters():
        if name in opt.bases:
            basis = opt.bases.entries[name]
            left, right = principal_leak(full(p) - start[name], basis.U, basis.V)
            leak = {"both": max(left, right), "left": left, "right": right}[opt.sides]
            if leak > 1e-5:
                raise AssertionError(f"{what}: {name} leaks {left:.1e}/{right:.1e}")


def main() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    from offprincipal.optim import OffPrincipalAdamW, OffPrincipalOptimizer

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, "run with --nproc_per_node=2"
    mesh = init_device_mesh("cpu", (world,))
    options = dict(top_k=4, cache_dir=False, progress=False)

    # bases are rank 0's even where another rank holds placeholder weights (memory-efficient loading)
    ref = build()
    opt_ref = OffPrincipalAdamW(ref.named_parameters(), lr=3e-3, weight_decay=0.1, **options)
    placeholder = build()
    if rank == 1:
        with torch.no_grad():
            for p in placeholder.parameters():
                p.zero_()
    opt_placeholder = OffPrincipalAdamW(placeholder.named_parameters(), **options)
    for name, basis in opt_ref.bases.entries.items():
        assert torch.equal(opt_placeholder.bases.entries[name].U, basis.U), f"rank {rank}: {name} bases not from rank 0"
    assert set(opt_ref.bases.entries) == {"fc1.weight", "fc2.weight", "fc3.weight"}

    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    train(ref, opt_ref)

    for sides in ("both", "left", "right"):
        ref_s, model = build(), build()
        for module in (model.fc1, model.fc2, model.fc3):
            fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        assert model.fc3.weight.to_local().shape[0] == (3 if rank == 0 else 2), "fc3 should split 3/2 rows"
        opt = OffPrincipalAdamW(model.named_parameters(), lr=3e-3, weight_decay=0.1, sides=sides, **options)
        train(model, opt)
        if sides == "both":
            compare("FSDP2 OffPrincipalAdamW sides=both", model, ref)
        else:
            opt_s = OffPrincipalAdamW(ref_s.named_parameters(), lr=3e-3, weight_decay=0.1, sides=sides, **options)
            train(ref_s, opt_s)
            compare(f"FSDP2 OffPrincipalAdamW sides={sides}", model, ref_s)
        check_leak(f"FSDP2 sides={sides}", model, start, opt)

    # project_ on a row-sharded DTensor equals the full projection (uneven shards: 33 rows)
    from torch.distributed.tensor import Shard, distribute_tensor

    from offprincipal.projection import project, project_

    gen = torch.Generator().manual_seed(9)
    D_full = torch.randn(33, 16, generator=gen)
    U = torch.linalg.qr(torch.randn(33, 4, generator=gen)).Q
    V = torch.linalg.qr(torch.randn(16, 4, generator=gen)).Q
    D = distribute_tensor(D_full, mesh, [Shard(0)])
    project_(D, U, V, "both")
    diff = (D.full_tensor() - project(D_full, U, V)).abs().max().item()
    assert diff < TOL, f"rank {rank}: project_ on a DTensor differs by {diff:.1e}"

    # any base optimizer, sharded
    ref_sgd, model = build(), build()
    fully_shard(model.fc1, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = OffPrincipalOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model.named_parameters(), **options)
    train(model, opt)
    opt_sgd = OffPrincipalOptimizer(torch.optim.SGD(ref_sgd.parameters(), lr=0.1, momentum=0.9), ref_sgd.named_parameters(), **options)
    train(ref_sgd, opt_sgd)
    compare("FSDP2 OffPrincipalOptimizer(SGD momentum)", model, ref_sgd)
    check_leak("FSDP2 OffPrincipalOptimizer", model, start, opt)

    # DDP: each rank sees half of the batch; averaged gradients equal the full-batch ones
    ddp = DistributedDataParallel(build())
    opt = OffPrincipalAdamW(ddp.module.named_parameters(), lr=3e-3, weight_decay=0.1, **options)
    train(ddp, opt, rows=slice(4 * rank, 4 * rank + 4))
    compare("DDP OffPrincipalAdamW", ddp.module, ref)

    dist.barrier()
    dist.destroy_process_group()
    if os.environ.get("FSDP_OK_DIR"):  # every check passed on this rank
        open(os.path.join(os.environ["FSDP_OK_DIR"], f"rank{rank}.ok"), "w").close()
    if rank == 0:
        print("FSDP WORKER OK", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module")  # our Linear outputs are not modified in place
    main()
