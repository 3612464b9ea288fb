"""Why 2-rank FSDP2 + AdamW differs from one process on the whole batch (issue 16, open item): one process, no FSDP.

The scenario is ``tests/_fsdp_adapter_worker.py``'s own (its tiny Llama, OffPrincipal adapter r=4, top_k=6 on all
linears, the 4-row batch, STEPS steps; its functions are imported, not copied). Two gradients per step:

- (a) whole batch: ``loss(rows 0-3).backward()``, what the worker's single-process reference computes;
- (b) mean of halves: ``(∇loss(rows 0-1) + ∇loss(rows 2-3)) / 2``, what two ranks with half of the batch each
  compute and FSDP2's averaging reduce-scatter gives (the worker checks FSDP2 + AdamW equals (b) bit for bit).

Mathematically equal (every row has the same number of tokens), they differ by reduction-order rounding only.
Part 1 trains with each and reports ΔW's relative difference per layer for SGD-momentum and AdamW.
Part 2 follows trajectory (b) with AdamW and, at each step, from the same parameters and optimizer state, applies
one AdamW step with g_a, with g_b, and with g_a + δ' where δ' is uniform *relative* noise (δ'_i ∝ g_a,i ξ_i, ξ ~ N(0,1))
scaled to ‖δ'‖ = ‖g_b − g_a‖: the relative change of the step it causes, per tensor. It also reports the median
per-coordinate relative noise |g_b,i − g_a,i| / |g_a,i| in the smallest and largest tenth of |g_a,i|.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fsdp_adamw_reduction.py --out benchmarks/results/fsdp_adamw_reduction_cpu.md
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import _fsdp_adapter_worker as worker  # noqa: E402

SETTINGS = (("SGD-momentum", 0.5), ("AdamW", 1e-3), ("AdamW", worker.ADAMW_LR), ("AdamW", 3e-2))


def fresh():
    from peft import get_peft_model

    return get_peft_model(worker.build(), worker.adapter_config(False)).train()


def optimizer(model, kind: str, lr: float):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr) if kind == "AdamW" else torch.optim.SGD(params, lr=lr, momentum=0.9)


def whole_batch_grads(model) -> None:
    worker.loss_of(model).backward()


def trained(base, kind: str, lr: float, grads) -> dict[str, torch.Tensor]:
    model = copy.deepcopy(base)
    opt = optimizer(model, kind, lr)
    for _ in range(worker.STEPS):
        grads(model)
        opt.step()
        opt.zero_grad()
    return {n: m.get_delta_weight("default").detach() for n, m in worker.layers_of(model).items()}


def short(name: str) -> str:
    return name.split("model.layers.")[-1]


def part1(base) -> list[str]:
    lines = ["## 1. ΔW after the steps: (a) whole batch vs (b) mean of the half-batch gradients", "",
             "| optimizer | lr | worst ‖ΔW_a − ΔW_b‖/‖ΔW_b‖ | next two layers |", "|---|---:|---|---|"]
    for kind, lr in SETTINGS:
        a = trained(base, kind, lr, whole_batch_grads)
        b = trained(base, kind, lr, worker.mean_of_half_batch_grads)
        diffs = sorted(((worker.rel(a[n], b[n]), short(n)) for n in a), reverse=True)
        lines.append(f"| {kind} | {lr:g} | {diffs[0][0]:.1e} ({diffs[0][1]}) | "
                     + ", ".join(f"{d:.1e} ({n})" for d, n in diffs[1:3]) + " |")
    return lines


def step_with(model, opt, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The parameter change of one optimizer step on copies of (model, opt) with these gradients."""
    model, opt = copy.deepcopy((model, opt))
    params = dict(model.named_parameters())
    before = {n: params[n].detach().clone() for n in grads}
    for n, g in grads.items():
        params[n].grad = g.clone()
    opt.step()
    return {n: params[n].detach() - before[n] for n in grads}


def part2(base, lr: float) -> list[str]:
    torch.manual_seed(1)
    model = copy.deepcopy(base)
    opt = optimizer(model, "AdamW", lr)
    lines = [f"## 2. One AdamW step (lr {lr:g}) from the same state along trajectory (b)", "",
             "Per step, the tensors with the largest step change from g_b vs g_a. `grad` = ‖g_b − g_a‖/‖g_a‖; "
             "`step` = ‖s(g_b) − s(g_a)‖/‖s(g_a)‖; `step, uniform` = the same for g_a + δ' (uniform relative noise of "
             "the same norm); `coord noise` = median |g_b,i − g_a,i|/|g_a,i| over the smallest / largest tenth of "
             "|g_a,i|; `carriers` = the fewest coordinates carrying 99 % of ‖s(g_b) − s(g_a)‖², their largest |g_a,i| and "
             "the tensor's RMS |g_a| (AdamW's ε = 1e-8).", "",
             "| step | tensor | grad | step | × grad | step, uniform | × grad | coord noise small / large | carriers |",
             "|---:|---|---:|---:|---:|---:|---:|---|---|"]
    for step in range(1, worker.STEPS + 1):
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        whole_batch_grads(model)
        ga = {n: params[n].grad.clone() for n in names}
        opt.zero_grad()
        worker.mean_of_half_batch_grads(model)
        gb = {n: params[n].grad.clone() for n in names}
        opt.zero_grad()
        gu = {}
        for n in names:
            noise = ga[n] * torch.randn_like(ga[n])
            scale = (gb[n] - ga[n]).norm() / noise.norm().clamp_min(1e-30)
            gu[n] = ga[n] + noise * scale
        sa, sb, su = step_with(model, opt, ga), step_with(model, opt, gb), step_with(model, opt, gu)
        rows = []
        for n in names:
            if sa[n].norm() == 0:
                continue  # A at step 1: B = 0 gives it a zero gradient and AdamW no step
            g_rel, s_rel, u_rel = worker.rel(gb[n], ga[n]), worker.rel(sb[n], sa[n]), worker.rel(su[n], sa[n])
            mag = ga[n].abs().flatten()
            noise = ((gb[n] - ga[n]).abs().flatten() / mag.clamp_min(1e-30))
            order = mag.argsort()
            tenth = max(1, mag.numel() // 10)
            small, large = noise[order[:tenth]].median().item(), noise[order[-tenth:]].median().item()
            change = ((sb[n] - sa[n]).flatten() ** 2).sort(descending=True)
            count = int((change.values.cumsum(0) < 0.99 * change.values.sum()).sum()) + 1
            carriers = (f"{count} of {mag.numel()}, |g| ≤ {mag[change.indices[:count]].max():.1e}, "
                        f"RMS {mag.pow(2).mean().sqrt():.1e}")
            rows.append((s_rel, short(n).replace(".default.weight", ""), g_rel, u_rel, small, large, carriers))
        for s_rel, n, g_rel, u_rel, small, large, carriers in sorted(rows, reverse=True)[:4]:
            lines.append(f"| {step} | {n} | {g_rel:.1e} | {s_rel:.1e} | {s_rel / max(g_rel, 1e-30):.0f} | {u_rel:.1e} | "
                         f"{u_rel / max(g_rel, 1e-30):.0f} | {small:.1e} / {large:.1e} | {carriers} |")
        for n in names:
            params[n].grad = gb[n]
        opt.step()
        opt.zero_grad()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    base = fresh()
    from offprincipal.files import write_text_atomic

    header = [
        "# 2-rank FSDP2 + AdamW vs one process: reduction-order rounding under AdamW's normalisation", "",
        f"Machine: 2-core AMD EPYC VM, CPU only ({platform.processor() or platform.machine()}); torch "
        f"{torch.__version__}, 1 thread, fp32. Command: `OMP_NUM_THREADS=1 .venv/bin/python "
        f"benchmarks/fsdp_adamw_reduction.py --out {args.out}`. Scenario: tests/_fsdp_adapter_worker.py (tiny Llama, "
        f"OffPrincipal r=4, top_k=6, all linears, 4 rows × 9 tokens, {worker.STEPS} steps).", "",
        "Two ranks (tests/test_fsdp.py::test_two_rank_fsdp2_adapter, `adamw_training` in the worker; same machine): "
        "FSDP2 + torch AdamW (lr 1e-2) gives gradients and factors bit-equal to (b) after every step, ΔW = B·A of "
        "the sharded factors to 1.0e-7 (its own rounding), and 2.1e-6 from (a) (model.layers.0.self_attn.q_proj): "
        "the whole-batch difference is (a) vs (b), below, not FSDP2's.", "",
    ]
    text = "\n".join(header + part1(base) + [""] + part2(base, worker.ADAMW_LR)) + "\n"
    write_text_atomic(args.out, text)
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
