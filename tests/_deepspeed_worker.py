"""Run by tests/test_deepspeed.py as ``torchrun --nproc_per_node=2 tests/_deepspeed_worker.py`` (CPU, gloo).

Real DeepSpeed (its CPU accelerator) on a tiny Llama, every rank checking:

- ZeRO-3, weights loaded partitioned under a live ``HfDeepSpeedConfig`` (shape (0,)): ``get_peft_model`` gives the
  single-process bases (bit for bit) and base fingerprint; the forward outside the engine's hooks (on a submodule of
  the module it wraps, before any engine forward) and of the unwrapped model (as TRL computes log-probs) is the
  single-process one; N steps of ``deepspeed.initialize``
  training give the single-process ΔW (fp32, ≤ 1e-6 relative); leak ≤ 1e-6; TRL's own ZeRO-3 sync generator
  (``VLLMGeneration._iter_named_params``) yields fl(W0 + ΔW) for every targeted weight, W0 for every other base
  parameter, nothing else, and leaves W0 bit for bit; the live diagnostics (leak, ‖ΔW‖/‖W0‖) gather and agree; merge/unmerge written back through ZeRO (modifier_rank=0)
  restores W0 bit for bit;
- weights partitioned by ``deepspeed.zero.Init`` alone (no HfDeepSpeedConfig): the single-process bases and fingerprint;
- ZeRO-3 with bf16 and ``buffer_dtype: bf16``: U and V stay fp32;
- ZeRO-2: N steps give the single-process ΔW (≤ 1e-6 relative), leak ≤ 1e-6;
- OffPrincipalAdamW under ZeRO-2 and on ZeRO-3 partitioned weights is refused with the one-line ZERO_REFUSAL.

Writes ``rank{N}.ok`` into $DS_OK_DIR when every check passed. Exits non-zero on the first failure.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist

TOL = 1e-6
STEPS = 3
LR = 1e-2


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(100 + step))


def adapter(model, cache_dir):
    import offprincipal  # noqa: F401  (registers the PEFT method)
    from peft import get_peft_model

    torch.manual_seed(1)  # A's random init: the same on every rank and in the reference
    config = offprincipal.OffPrincipalConfig(r=4, alpha=8, top_k=2, target_modules="all-linear",
                                             subspace_cache_dir=str(cache_dir))
    return get_peft_model(model, config)


def layers(model):
    from offprincipal.tuner.layer import OffPrincipalLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, OffPrincipalLayer)}


def deltas(model) -> dict[str, torch.Tensor]:
    return {n: m.get_delta_weight("default").detach().clone() for n, m in layers(model).items()}


def train_reference(model) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    for step in range(STEPS):
        ids = batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def ds_config(stage: int, **extra) -> dict:
    zero = {"stage": stage}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = 0  # partition even tiny tensors, as real hidden sizes are
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_optimization": zero,
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9, **extra}


def engine_for(model, config):
    import deepspeed

    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, config=config,
                                      optimizer=torch.optim.AdamW(trainable, lr=LR))
    return engine


def train_engine(engine, rank: int) -> None:
    for step in range(STEPS):
        ids = batch(step)[2 * rank: 2 * rank + 2]  # each rank half of the global batch
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


def check_deltas(what: str, got: dict, want: dict, rank: int) -> None:
    assert set(got) == set(want) and got, f"{what}: layers {sorted(got)} != {sorted(want)}"
    worst = max(rel(got[n], want[n]) for n in want)
    assert worst <= TOL, f"rank {rank}: {what}: ΔW differs from single-process by {worst:.1e} (relative)"
    if rank == 0:
        print(f"{what}: ΔW vs single process, worst relative difference {worst:.1e}", flush=True)


def check_leak(what: str, model, rank: int) -> None:
    from offprincipal import max_principal_leak

    leak = max_principal_leak(model)
    assert leak <= TOL, f"rank {rank}: {what}: principal leak {leak:.1e}"
    if rank == 0:
        print(f"{what}: principal leak {leak:.1e}", flush=True)


def expect_refusal(what: str, fn) -> None:
    from offprincipal.integrations.deepspeed import ZERO_REFUSAL

    head = ZERO_REFUSAL.split("{what}")[0].format(owner="OffPrincipalAdamW")
    try:
        fn()
    except RuntimeError as err:
        text = str(err)
        assert text.startswith(head) and "\n" not in text and "OffPrincipalConfig" in text and "FSDP2" in text, text
        return
    raise AssertionError(f"{what}: OffPrincipalAdamW was not refused")


def zero3(out: Path, model_dir: Path, rank: int, ref, ref_logits0, ref_deltas) -> None:
    import deepspeed
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from trl.distributed import DistributedBackend
    from trl.generation.vllm_generation import VLLMGeneration

    from offprincipal.optim import OffPrincipalAdamW

    config = ds_config(3)
    keep = HfDeepSpeedConfig(config)  # alive: from_pretrained loads the weights partitioned (zero.Init)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    q = base.model.layers[0].self_attn.q_proj.weight
    assert tuple(q.shape) == (0,) and q.ds_numel == 256, "the base should be ZeRO-3 partitioned"
    expect_refusal("ZeRO-3 partitioned weights", lambda: OffPrincipalAdamW(base.named_parameters(), top_k=2))
    model = adapter(base, out / "cache3")

    # bases and fingerprint: the single-process ones, bit for bit
    ref_layers, got_layers = layers(ref), layers(model)
    assert set(got_layers) == set(ref_layers) and len(got_layers) == 7
    for name, layer in got_layers.items():
        for side in ("offprincipal_U", "offprincipal_V"):
            mine, theirs = getattr(layer, side)["default"], getattr(ref_layers[name], side)["default"]
            assert mine.dtype == torch.float32 and torch.equal(mine, theirs), f"rank {rank}: {name} {side} differs"
    assert model.peft_config["default"].base_fingerprint == ref.peft_config["default"].base_fingerprint

    engine = engine_for(model, config)
    a = got_layers["base_model.model.model.layers.0.mlp.up_proj"].offprincipal_A["default"].weight
    assert tuple(a.shape) == (0,), "the factors should be partitioned by the engine"
    ids = batch(0)
    with torch.no_grad():  # outside the engine's hooks (a submodule of what it wraps), before any engine forward
        logits0 = model.get_base_model()(input_ids=ids).logits
        assert torch.allclose(logits0, ref_logits0, atol=1e-6), f"rank {rank}: forward outside the engine differs"
        logits0 = model(input_ids=ids).logits  # the unwrapped model (TRL's old/ref log-probs)
    assert torch.allclose(logits0, ref_logits0, atol=1e-6), f"rank {rank}: forward of the unwrapped model differs"

    train_engine(engine, rank)
    from offprincipal.diagnostics import AdapterDiagnostics  # the live diagnostics gather layer by layer

    live, want = AdapterDiagnostics()(model), AdapterDiagnostics()(ref)
    assert live["offprincipal/leak_max"] <= TOL, live
    assert abs(live["offprincipal/update_rel_mean"] / want["offprincipal/update_rel_mean"] - 1) <= 1e-5, (live, want)
    with torch.no_grad():  # outside the engine, after training: ΔW is applied
        logits = model(input_ids=ids).logits
    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params):
        check_deltas("ZeRO-3", deltas(model), ref_deltas, rank)
        check_leak("ZeRO-3", model, rank)
        with torch.no_grad():
            ref_logits = ref(input_ids=ids).logits
    assert torch.allclose(logits, ref_logits, atol=1e-5), f"rank {rank}: trained forward outside the engine differs"

    # base weights W0 and adapter ΔW, as gathered now
    plain = {n.removeprefix("base_model.model.").replace(".base_layer", ""): p for n, p in model.named_parameters()
             if "offprincipal_" not in n}
    with deepspeed.zero.GatheredParameters(params):
        W0 = {n: p.detach().clone() for n, p in plain.items()}
        delta = deltas(model)
    targeted = {n.removeprefix("base_model.model.") + ".weight": d for n, d in delta.items()}

    try:  # merging needs the gathered weights (TRL gathers them): one clear error, nothing changed
        model.merge_adapter()
        raise AssertionError("merge_adapter on partitioned weights was not refused")
    except RuntimeError as err:
        assert "GatheredParameters" in str(err) and not any(m.merged for m in layers(model).values()), err

    # TRL's own ZeRO-3 sync generator: gather all, merge_adapter, yield, unmerge_adapter
    accelerator = SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)))
    sync = VLLMGeneration.__new__(VLLMGeneration)
    sync.model, sync._dist = model, DistributedBackend(accelerator)
    assert sync._dist.is_zero3
    sent = {name: t.clone() for name, t in sync._iter_named_params()}
    assert set(sent) == set(W0), f"TRL sync sent {sorted(set(sent) ^ set(W0))} unexpectedly"
    assert set(targeted) <= set(W0) and len(targeted) == 7
    for name, w in sent.items():
        want = (W0[name].float() + targeted[name]).to(w.dtype) if name in targeted else W0[name]
        assert torch.equal(w, want), f"rank {rank}: TRL sync sent a wrong {name}"
    with deepspeed.zero.GatheredParameters(params):
        assert all(torch.equal(p, W0[n]) for n, p in plain.items()), "sync left the base changed"
        assert not any(layer.merged for layer in layers(model).values())

    # merge and unmerge written back through ZeRO (modifier_rank=0): the base returns bit for bit
    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        model.merge_adapter()
        merged = {n: plain[n].detach().clone() for n in targeted}
        model.unmerge_adapter()
    with deepspeed.zero.GatheredParameters(params):
        for n in targeted:
            assert torch.equal(merged[n], (W0[n].float() + targeted[n]).to(W0[n].dtype)), f"{n}: merged wrongly"
        assert all(torch.equal(p, W0[n]) for n, p in plain.items()), f"rank {rank}: unmerge did not restore W0"
    if rank == 0:
        print("ZeRO-3: TRL sync yields fl(W0 + ΔW) for the 7 targeted weights, W0 for the rest; unmerge exact",
              flush=True)
    del engine, model, base, keep


def zero_init_alone(out: Path, rank: int) -> None:
    """Weights partitioned by ``deepspeed.zero.Init`` with no HfDeepSpeedConfig alive (PEFT's gather_params_ctx would
    not gather here): the bases and fingerprint are those of the same weights in one process."""
    import deepspeed
    from peft import get_peft_model
    from torch import nn
    from transformers.integrations import is_deepspeed_zero3_enabled

    import offprincipal

    assert not is_deepspeed_zero3_enabled()
    torch.manual_seed(3)
    with deepspeed.zero.Init(config_dict_or_path=ds_config(3)):
        model = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8))
    assert tuple(model[0].weight.shape) == (0,)
    plain = nn.Sequential(nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 8))
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        plain.load_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
    config = dict(r=2, top_k=3, target_modules=["0", "2"])
    model = get_peft_model(model, offprincipal.OffPrincipalConfig(subspace_cache_dir=str(out / "cache-init"), **config))
    plain = get_peft_model(plain, offprincipal.OffPrincipalConfig(subspace_cache_dir=False, **config))
    for i in (0, 2):
        for side in ("offprincipal_U", "offprincipal_V"):
            mine, want = getattr(model.base_model.model[i], side)["default"], getattr(plain.base_model.model[i], side)["default"]
            assert torch.equal(mine, want), f"rank {rank}: zero.Init layer {i} {side} differs"
    assert model.peft_config["default"].base_fingerprint == plain.peft_config["default"].base_fingerprint


def zero3_bf16(out: Path, model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    config = ds_config(3, bf16={"enabled": True}, data_types={"buffer_dtype": "bf16"})
    keep = HfDeepSpeedConfig(config)
    model = adapter(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16), out / "cache3bf16")
    engine = engine_for(model, config)
    found = 0
    for name, buf in engine.module.named_buffers():
        if "offprincipal_U" in name or "offprincipal_V" in name:
            assert buf.dtype == torch.float32, f"{name} was cast to {buf.dtype} by the engine"
            found += 1
        elif buf.is_floating_point():
            assert buf.dtype == torch.bfloat16, f"buffer_dtype bf16 should cast {name}"  # the engine did cast
    assert found == 14, found
    assert next(p for n, p in engine.module.named_parameters() if "q_proj.base_layer" in n).dtype == torch.bfloat16
    del engine, model, keep


def zero2(out: Path, model_dir: Path, rank: int, ref_deltas) -> None:
    from transformers import AutoModelForCausalLM

    from offprincipal.optim import OffPrincipalAdamW

    model = adapter(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), out / "cache2")
    engine = engine_for(model, ds_config(2))
    train_engine(engine, rank)
    check_deltas("ZeRO-2", deltas(model), ref_deltas, rank)
    check_leak("ZeRO-2", model, rank)
    del engine

    import deepspeed

    def refused():
        plain = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        opt = OffPrincipalAdamW(plain.named_parameters(), lr=LR, top_k=2, cache_dir=False, progress=False)
        engine, *_ = deepspeed.initialize(model=plain, optimizer=opt, config=ds_config(2))
        ids = batch(0)[2 * rank: 2 * rank + 2]
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()

    expect_refusal("ZeRO-2", refused)


def main() -> None:
    import deepspeed
    from transformers import AutoModelForCausalLM

    dist.init_process_group("gloo")
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, "run with --nproc_per_node=2"
    out = Path(os.environ["DS_OK_DIR"])
    model_dir = out / "tiny-llama"
    if rank == 0:
        tiny_llama().save_pretrained(model_dir)
    dist.barrier()

    start = time.perf_counter()
    ref = adapter(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), out / f"cache-ref{rank}")
    with torch.no_grad():
        ref_logits0 = ref(input_ids=batch(0)).logits
    train_reference(ref)
    ref_deltas = deltas(ref)

    zero3(out, model_dir, rank, ref, ref_logits0, ref_deltas)
    zero_init_alone(out, rank)
    zero3_bf16(out, model_dir)
    zero2(out, model_dir, rank, ref_deltas)

    dist.barrier()
    if rank == 0:
        print(f"DEEPSPEED WORKER OK in {time.perf_counter() - start:.0f} s", flush=True)
    (out / f"rank{rank}.ok").touch()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    main()
