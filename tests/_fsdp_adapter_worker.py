"""Run by tests/test_fsdp.py as ``torchrun --nproc_per_node=2 tests/_fsdp_adapter_worker.py`` (CPU, gloo).

The OffPrincipal adapter under FSDP2 the way TRL's fsdp2 recipe runs it, on a tiny Llama (fp32):

1. rank 0 builds the model with real weights, rank 1 on the meta device (FSDP CPU-RAM-efficient loading);
   ``get_peft_model`` gives rank 1 rank 0's bases: equal, bit for bit, to the bases one process computes from the
   real weights, fp32, not on meta; one base fingerprint; only rank 0's subspace cache is written;
2. accelerate's own ``fsdp2_prepare_model`` (cpu_ram_efficient_loading, decoder-layer wrapping) shards it and
   loads rank 0's weights; the bases survive on both ranks;
3. STEPS SGD-momentum steps, half of the batch per rank, equal one process on the whole batch: ΔW of every layer to
   TOL relative; leak ‖UᵀΔW‖/‖ΔW‖, ‖ΔW V‖/‖ΔW‖ ≤ TOL; STEPS AdamW steps (torch's, on the adapter's parameters)
   equal one process on the mean of the two half-batch gradients: gradients and factors bit for bit after every
   step, ΔW to TOL, leak ≤ TOL (not the whole batch: see adamw_training);
4. merge_adapter gives W0 + ΔW; unmerge_adapter restores every base shard bit for bit;
5. TRL's FSDP2 weight sync (``VLLMGeneration._iter_named_params`` → ``_iter_fsdp2_params``) sends W0 + ΔW for
   every targeted weight, the unchanged base for the others, under vLLM's names, and no adapter parameter;
6. to_lora / save_as_lora and save_pretrained (through torch's full state dict, as Trainer saves under FSDP2)
   export the trained ΔW; merge_and_unload gives W0 + ΔW;
7. GPT-2's Conv1D (the weight stored transposed) merges like one process and unmerges exactly; FSDP2 bf16
   compute (MixedPrecisionPolicy) keeps U and V fp32;
8. FSDP1 wrapping the factors' nn.Linear leaves is refused with one line; decoder-level FSDP1 runs.

Exits non-zero on the first failed check; each rank writes ``rank{r}.ok`` into $FSDP_OK_DIR when all passed.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import tiny_batch, tiny_config  # noqa: E402

TOL = 1e-6
STEPS = 3
ADAMW_LR = 1e-2
TARGETED = 14  # 7 linears × 2 decoder layers


def build(meta: bool = False):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device("meta") if meta else contextlib.nullcontext():
        return AutoModelForCausalLM.from_config(tiny_config("llama"))


def adapter_config(cache):
    import offprincipal

    return offprincipal.OffPrincipalConfig(r=4, top_k=6, target_modules="all-linear", subspace_cache_dir=cache)


def layers_of(model) -> dict:
    from offprincipal.tuner.layer import OffPrincipalLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, OffPrincipalLayer)}


def full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def check(ok: bool, message: str) -> None:
    if not ok:
        raise AssertionError(f"rank {dist.get_rank()}: {message}")


def say(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


def vllm_name(name: str) -> str:
    return name.removeprefix("base_model.model.").replace(".base_layer", "")


def loss_of(model, rows=slice(None)):
    batch = tiny_batch(batch=4, length=9, seed=3)
    ids = batch["input_ids"][rows]
    return model(input_ids=ids, attention_mask=batch["attention_mask"][rows], labels=ids).loss


def mean_of_half_batch_grads(model) -> None:
    """One process doing what the two ranks do: each half of the batch's gradient (rows 0-1, then 2-3, the shapes
    each rank computes), then ``.grad = (g₀ + g₁) / 2``, FSDP2's averaging reduce-scatter."""
    params = [p for p in model.parameters() if p.requires_grad]
    halves = []
    for rank in (0, 1):
        loss_of(model, slice(2 * rank, 2 * rank + 2)).backward()
        halves.append([p.grad for p in params])
        for p in params:
            p.grad = None
    for p, g0, g1 in zip(params, *halves):
        p.grad = (g0 + g1) / 2


def build_on_meta_beyond_rank0(rank: int):
    """Rank 0: real weights. Other ranks: weights on the meta device and real non-persistent buffers (RoPE's
    inv_freq), the state FSDP's CPU-RAM-efficient loading gives non-zero ranks (transformers'
    ``_move_missing_keys_from_meta_to_device``; transformers 5.23 fills such weights from the checkpoint on every
    rank, other loaders leave them on meta)."""
    if rank == 0:
        return build()
    model, real = build(meta=True), build()
    for (name, module), (_, twin) in zip(model.named_modules(), real.named_modules()):
        for buffer in module._non_persistent_buffers_set:
            module._buffers[buffer] = twin._buffers[buffer]
    return model


def bases_from_rank0(rank: int, ref, out: Path):
    """Checks 1: rank 1 holds meta weights; its bases are rank 0's, equal to single-process bases."""
    from peft import get_peft_model

    from offprincipal.subspace import compute_subspaces
    from offprincipal.tuner.fingerprint import base_fingerprint

    model = build_on_meta_beyond_rank0(rank)
    caches = {r: out / f"cache{r}" for r in (0, 1)}
    check((rank == 0) == (model.model.layers[0].mlp.up_proj.weight.device.type != "meta"), "meta weights on rank 1")
    model = get_peft_model(model, adapter_config(str(caches[rank])))
    layers, ref_layers = layers_of(model), layers_of(ref)
    check(len(layers) == TARGETED, f"{len(layers)} adapted layers, expected {TARGETED}")
    # single-process bases: this rank's own SVD of the real weights (the reference model is real on every rank)
    local = compute_subspaces(
        {n: m.get_base_layer().weight for n, m in ref_layers.items()}, 6, cache_dir=False, progress=False
    )
    for name, layer in layers.items():
        U, V = layer.offprincipal_U["default"], layer.offprincipal_V["default"]
        for got, want, what in ((U, local[name].U, "U"), (V, local[name].V, "V")):
            check(got.device.type == "cpu" and got.dtype == torch.float32, f"{name} {what} is {got.dtype} on {got.device}")
            check(torch.equal(got, want), f"{name}: {what} differs from the single-process basis")
    fp = model.peft_config["default"].base_fingerprint
    real = base_fingerprint(layers_of(ref.base_model.model))  # this rank's own digest of the real weights
    check(fp is not None and fp == real == ref.peft_config["default"].base_fingerprint, "base fingerprint differs")
    dist.barrier()
    written = {r: sorted(p.name for p in caches[r].rglob("*") if p.is_file()) if caches[r].exists() else [] for r in (0, 1)}
    check(len(written[0]) > 0 and written[1] == [], f"subspace caches written: {written}")
    say(f"bases: rank 1 (meta weights) holds rank 0's bases, equal to one process's; cache on rank 0 only "
        f"({len(written[0])} files)")
    return model


def shard_like_accelerate(model):
    """accelerate's fsdp2_prepare_model with TRL's fsdp2 recipe: decoder-layer wrapping, CPU-RAM-efficient loading
    (the model goes to meta, rank 0's state dict is broadcast, non-persistent buffers are re-registered)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, cpu_ram_efficient_loading=True, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["LlamaDecoderLayer"], reshard_after_forward=True,
        state_dict_type="FULL_STATE_DICT",
    )
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin), device=torch.device("cpu"),
        is_main_process=dist.get_rank() == 0, mixed_precision="no",
    )
    return fsdp2_prepare_model(accelerator, model)


def conv1d_merge() -> None:
    """GPT-2 stores Wᵀ (Conv1D, sharded by its n rows): ΔWᵀ comes out ``Shard(1)`` and is redistributed; merge
    equals one process's, unmerge is exact."""
    from peft import get_peft_model
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    def gpt2():
        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_config(tiny_config("gpt2")), adapter_config(False))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "offprincipal_B" in n:
                    p.normal_(std=0.1)
        return model

    ref, model = gpt2(), gpt2()
    for block in model.base_model.model.transformer.h:
        fully_shard(block)
    fully_shard(model)
    layers, ref_layers = layers_of(model), layers_of(ref)
    shards = {n: m.get_base_layer().weight.to_local().clone() for n, m in layers.items()}
    model.merge_adapter()
    ref.merge_adapter()
    worst = max(rel(full(m.get_base_layer().weight), ref_layers[n].get_base_layer().weight) for n, m in layers.items())
    check(len(layers) == 8 and worst <= TOL, f"Conv1D merge differs from one process by {worst:.2e}")
    model.unmerge_adapter()
    for n, m in layers.items():
        check(torch.equal(m.get_base_layer().weight.to_local(), shards[n]), f"{n}: Conv1D unmerge not exact")
    # a plain ΔW (equal on every rank) beside a sharded weight is taken as replicated: each rank keeps its rows
    from offprincipal.integrations.fsdp import like

    weight = next(iter(layers.values())).get_base_layer().weight
    delta = torch.arange(weight.numel(), dtype=torch.float32).reshape(weight.shape)
    check(torch.equal(like(delta, weight).full_tensor(), delta), "like() of a plain ΔW")
    say(f"GPT-2 Conv1D (Wᵀ sharded): merge equals one process to {worst:.1e}, unmerge exact")


def bf16_compute() -> None:
    """FSDP2 mixed precision (bf16 compute, fp32 reduction): the forward gets bf16 factors, U and V stay fp32 and
    the projection runs in fp32; the gradients of the factors are finite and the bf16 loss is within bf16 rounding
    of the fp32 one."""
    from peft import get_peft_model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    def model():
        model = get_peft_model(build(), adapter_config(False))
        torch.manual_seed(1)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "offprincipal_B" in n:
                    p.normal_(std=0.1)
        return model

    ref, sharded = model(), model()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in sharded.base_model.model.model.layers:
        fully_shard(layer, mp_policy=policy)
    fully_shard(sharded, mp_policy=policy)
    loss = loss_of(sharded)
    loss.backward()
    expected = loss_of(ref).item()
    grads = [p.grad for n, p in sharded.named_parameters() if p.requires_grad]
    check(all(g is not None and bool(torch.isfinite(g.full_tensor()).all()) for g in grads), "bf16: factor grads")
    for layer in layers_of(sharded).values():
        check(layer.offprincipal_U["default"].dtype == layer.offprincipal_V["default"].dtype == torch.float32, "U, V")
    check(abs(loss.item() - expected) <= 2e-2 * abs(expected), f"bf16 loss {loss.item():.4f} vs fp32 {expected:.4f}")
    say(f"FSDP2 bf16 compute: U, V fp32; loss {loss.item():.4f} (fp32 {expected:.4f}); factor grads finite")


def adamw_training() -> None:
    """Checks 3b: torch's AdamW on the adapter's parameters (as a get_peft_model + accelerate user runs it), STEPS
    steps, half of the batch per rank, equals one process on the mean of the same two half-batch gradients
    (:func:`mean_of_half_batch_grads`): gradients and factors bit for bit after every step, ΔW = B·A to TOL, leak ≤
    TOL. The reference is that mean, not the whole-batch gradient: the two differ by reduction-order rounding
    (~1e-7 of a tensor's norm), and A's first AdamW step (the step after B leaves 0) is ≈ sign(g) per coordinate, so
    the few coordinates whose gradient is near ε carry that rounding, large relative to them, into full-size steps:
    ΔW of one process on the whole batch differs by up to 2.1e-6 here (benchmarks/results/fsdp_adamw_reduction_cpu.md).
    """
    from peft import get_peft_model

    from offprincipal import max_principal_leak

    model = get_peft_model(build(), adapter_config(False))
    halves, whole = copy.deepcopy(model), copy.deepcopy(model)
    model = shard_like_accelerate(model)
    refs = {"halves": halves, "whole": whole}
    with torch.no_grad():  # rank 0's factors (broadcast by accelerate) into both references
        for ref in refs.values():
            ref_params = dict(ref.named_parameters())
            for n, p in model.named_parameters():
                ref_params[n].copy_(full(p))
    trained = [p for p in model.parameters() if p.requires_grad]
    opts = [torch.optim.AdamW(trained, lr=ADAMW_LR)] + [
        torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=ADAMW_LR) for ref in refs.values()
    ]
    for m in (model, *refs.values()):
        m.train()
    rank = dist.get_rank()
    factors = [(p, dict(halves.named_parameters())[n]) for n, p in model.named_parameters() if p.requires_grad]
    for step in range(1, STEPS + 1):
        loss_of(model, slice(2 * rank, 2 * rank + 2)).backward()
        mean_of_half_batch_grads(halves)
        loss_of(whole).backward()
        check(all(torch.equal(full(p.grad), q.grad) for p, q in factors), f"AdamW step {step}: gradients not bit-equal")
        for o in opts:
            o.step()
            o.zero_grad()
        check(all(torch.equal(full(p), q) for p, q in factors), f"AdamW step {step}: factors not bit-equal")
    for m in (model, *refs.values()):
        m.eval()
    layers = layers_of(model)
    deltas = {n: full(m.get_delta_weight("default")) for n, m in layers.items()}
    ref_deltas = {k: {n: m.get_delta_weight("default").detach() for n, m in layers_of(r).items()} for k, r in refs.items()}
    check(all(ref_deltas["halves"][n].norm() > 0 for n in layers), "AdamW: a layer did not train")
    worst = max(rel(deltas[n], ref_deltas["halves"][n]) for n in layers)  # ΔW = B·A of sharded factors: rounding
    check(worst <= TOL, f"FSDP2 AdamW ΔW differs from one process on the half-batch gradients by {worst:.2e}")
    leak = max_principal_leak(model)
    check(leak <= TOL, f"AdamW: leak {leak:.2e}")
    name, whole_diff = max(((n, rel(deltas[n], ref_deltas["whole"][n])) for n in layers), key=lambda t: t[1])
    say(f"AdamW: {STEPS} steps (lr {ADAMW_LR:g}, half the batch per rank): gradients and factors bit-equal to one "
        f"process on the mean of the half-batch gradients, ΔW to {worst:.1e}, leak {leak:.1e}; (one process on the "
        f"whole batch: {whole_diff:.1e}, {vllm_name(name)})")


def main() -> None:
    from peft import PeftModel, get_peft_model
    from torch.distributed.tensor import DTensor

    from offprincipal import max_principal_leak, save_as_lora, to_lora

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    check(dist.get_world_size() == 2, "run with --nproc_per_node=2")
    out = Path(os.environ.get("FSDP_OK_DIR") or tempfile.mkdtemp())

    ref = get_peft_model(build(), adapter_config(False))  # one process's model, on every rank
    model = bases_from_rank0(rank, ref, out)
    model = shard_like_accelerate(model)
    layers, ref_layers = layers_of(model), layers_of(ref)
    check(isinstance(next(iter(layers.values())).offprincipal_B["default"].weight, DTensor), "factors not sharded")
    for name, layer in layers.items():
        for which in ("offprincipal_U", "offprincipal_V"):
            got, want = getattr(layer, which)["default"], getattr(ref_layers[name], which)["default"]
            check(not isinstance(got, DTensor) and torch.equal(got, want), f"{name} {which} lost by fsdp2_prepare_model")
    ref_params = dict(ref.named_parameters())
    with torch.no_grad():  # rank 0's factors (broadcast by accelerate) into the reference
        for n, p in model.named_parameters():
            if p.requires_grad:
                ref_params[n].copy_(full(p))
            else:
                check(torch.equal(full(p), ref_params[n]), f"{n}: rank 0's weights were not loaded")
    say("fsdp2_prepare_model (accelerate, cpu_ram_efficient_loading): weights loaded from rank 0, bases kept")

    # 3. training: two ranks with half a batch each against one process with the whole batch
    W0 = {n: full(m.get_base_layer().weight).clone() for n, m in ref_layers.items()}
    # SGD with momentum against one process on the WHOLE batch: linear in the gradients, so the two runs differ by
    # the reduction-order rounding of the gradients only (≤ 3e-7 on ΔW). AdamW is checked by adamw_training() against
    # one process on the mean of the two half-batch gradients, which FSDP2 equals bit for bit; against the whole batch
    # AdamW differs by up to 2.1e-6 (lr 1e-2; the 9e-6 first reported came from a setting not recorded) — not an FSDP2 fault: the
    # whole-batch and half-batch-mean gradients differ by ~1.2e-7 of each tensor's norm, and A's first AdamW step
    # (after B leaves 0) is ≈ sign(g): the 1-4 coordinates of A with |g| ≤ 3e-7 (RMS 5e-5..7e-3; ε = 1e-8) turn their
    # large relative rounding into full-size steps, ×20-60 on the step (×1 for uniform relative noise of equal norm).
    # Figures: benchmarks/fsdp_adamw_reduction.py → benchmarks/results/fsdp_adamw_reduction_cpu.md.
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    opt_ref = torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.5, momentum=0.9)
    model.train(), ref.train()
    for _ in range(STEPS):
        loss_of(model, slice(2 * rank, 2 * rank + 2)).backward()
        loss_of(ref).backward()
        for o in (opt, opt_ref):
            o.step()
            o.zero_grad()
    model.eval(), ref.eval()
    deltas = {n: full(layers[n].get_delta_weight("default")) for n in layers}
    ref_deltas = {n: m.get_delta_weight("default").detach() for n, m in ref_layers.items()}
    worst = max(rel(deltas[n], ref_deltas[n]) for n in layers)
    check(all(ref_deltas[n].norm() > 0 for n in layers), "a layer did not train")
    check(worst <= TOL, f"FSDP2 ΔW differs from one process by {worst:.2e} (relative)")
    leak = max_principal_leak(model)
    check(leak <= TOL, f"leak {leak:.2e}")
    say(f"training: {STEPS} SGD-momentum steps (half the batch per rank), ΔW relative difference to one process ≤ {worst:.1e}; leak {leak:.1e}")
    adamw_training()

    # 4. merge / unmerge on the sharded base weights
    shards = {n: m.get_base_layer().weight.to_local().clone() for n, m in layers.items()}
    model.merge_adapter()
    worst = max(rel(full(m.get_base_layer().weight), W0[n] + ref_deltas[n]) for n, m in layers.items())
    check(worst <= TOL, f"merged weight differs from W0 + ΔW by {worst:.2e}")
    model.unmerge_adapter()
    for n, m in layers.items():
        check(torch.equal(m.get_base_layer().weight.to_local(), shards[n]), f"{n}: unmerge did not restore the shard")
    say(f"merge: W0 + ΔW to {worst:.1e}; unmerge restores every shard bit for bit")

    # 5. TRL's own FSDP2 weight sync, up to the vLLM boundary
    from trl.distributed import DistributedBackend
    from trl.generation.vllm_generation import VLLMGeneration

    sync = VLLMGeneration.__new__(VLLMGeneration)  # the sync needs only these three attributes
    sync.model = model
    sync.accelerator = SimpleNamespace(device=torch.device("cpu"))
    sync._dist = DistributedBackend(
        SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=None, fsdp_plugin=SimpleNamespace(fsdp_version=2)))
    )
    sent = {name: t.detach().clone() for name, t in sync._iter_named_params()}
    base_names = {n for n, _ in build(meta=True).named_parameters()}
    check(set(sent) == base_names, f"sent {sorted(set(sent) ^ base_names)} beyond/short of the base's parameters")
    targeted = {vllm_name(n) + ".weight": n for n in layers}
    worst = 0.0
    for name, t in sent.items():
        if name in targeted:
            worst = max(worst, rel(t, W0[targeted[name]] + ref_deltas[targeted[name]]))
        else:
            check(torch.equal(t, ref_params["base_model.model." + name]), f"{name} was sent changed")
    check(worst <= TOL, f"TRL sent W0 + ΔW off by {worst:.2e}")
    for n, m in layers.items():
        check(torch.equal(m.get_base_layer().weight.to_local(), shards[n]), f"{n}: TRL's sync left the base changed")
    say(f"TRL _iter_named_params (FSDP2): {len(sent)} tensors, {len(targeted)} of them W0 + ΔW (≤ {worst:.1e}), "
        "no adapter parameter, base restored bit for bit")

    # 6. export and save
    lora_config, lora_sd = to_lora(model)
    worst = max(
        rel(lora_sd[f"{n}.lora_B.weight"] @ lora_sd[f"{n}.lora_A.weight"], ref_deltas[n]) for n in layers
    )
    check(worst <= TOL and lora_config.r == 4, f"to_lora's ΔW off by {worst:.2e}")
    lora_dir, peft_dir = out / "lora", out / "peft"
    save_as_lora(model, lora_dir)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        model.save_pretrained(str(peft_dir), state_dict=state)
    dist.barrier()
    check(sorted(p.name for p in lora_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"],
          "save_as_lora wrote something else")
    from safetensors import safe_open

    with safe_open(str(peft_dir / "adapter_model.safetensors"), "pt") as saved:
        settings = [k for k in saved.keys() if k.endswith("offprincipal_settings")]
    check(len(settings) == TARGETED, f"{len(settings)} layers' settings saved, expected {TARGETED}")
    lora = PeftModel.from_pretrained(build(), str(lora_dir))
    loaded = PeftModel.from_pretrained(build(), str(peft_dir))  # every rank loads: the bases come from rank 0
    for n in layers:
        got = lora.get_submodule(n).get_delta_weight("default")
        worst = max(worst, rel(got, ref_deltas[n]), rel(layers_of(loaded)[n].get_delta_weight("default"), ref_deltas[n]))
    check(worst <= TOL, f"saved adapters' ΔW off by {worst:.2e}")
    merged = model.merge_and_unload()
    for n in layers:
        w = full(merged.get_submodule(vllm_name(n)).weight)
        worst = max(worst, rel(w, W0[n] + ref_deltas[n]))
    check(worst <= TOL and not any("offprincipal" in n for n, _ in merged.named_parameters()), "merge_and_unload")
    say(f"to_lora, save_as_lora, save_pretrained(state_dict=full), merge_and_unload: ΔW to {worst:.1e}")

    conv1d_merge()
    bf16_compute()

    # 8. FSDP1: per-leaf wrapping of the factors refused with one line; decoder-level wrapping runs
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    plain = get_peft_model(build(), adapter_config(False))
    with torch.no_grad():
        expected = plain(**tiny_batch(batch=2, length=7)).logits
    leaf = FSDP(copy.deepcopy(plain), auto_wrap_policy=ModuleWrapPolicy({nn.Linear}), device_id=torch.device("cpu"))
    try:
        leaf(**tiny_batch(batch=2, length=7))
    except RuntimeError as exc:
        message = str(exc)
        check("FSDP1" in message and "fully_shard" in message and "\n" not in message, f"unclear refusal: {message}")
    else:
        check(False, "FSDP1 per-leaf wrapping of the factors was not refused")
    layerwise = FSDP(plain, auto_wrap_policy=ModuleWrapPolicy({LlamaDecoderLayer}), device_id=torch.device("cpu"),
                     use_orig_params=True)
    with torch.no_grad():
        diff = (layerwise(**tiny_batch(batch=2, length=7)).logits - expected).abs().max().item()
    check(diff <= 1e-5, f"decoder-level FSDP1 forward differs by {diff:.1e}")
    say(f"FSDP1: per-leaf wrapping refused ({message[:60]}…); decoder-level forward equal to {diff:.1e}")

    dist.barrier()
    dist.destroy_process_group()
    if os.environ.get("FSDP_OK_DIR"):
        (out / f"rank{rank}.ok").touch()
    if rank == 0:
        print("FSDP ADAPTER WORKER OK", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore")
    main()
