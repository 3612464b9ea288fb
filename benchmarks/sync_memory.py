"""Memory and time of TRL's vLLM weight sync: an OffPrincipal adapter against LoRA, side by side in one run.

TRL's ``GRPOTrainer`` (``use_vllm=True``, colocate or server) syncs by ``VLLMGeneration._iter_named_params``: merge
every adapter layer, yield every base weight under its vLLM name, unmerge. This script builds stock ``GRPOTrainer``s
(``peft_config=LoraConfig`` and ``peft_config=OffPrincipalConfig``, same rank, "all-linear") on the same base, gives
both adapters a ΔW of the same size (``--delta``: RMS of ΔW per entry relative to the RMS of W0), and runs TRL's own
generator (:func:`offprincipal.integrations.trl.trl_weight_stream`; vLLM itself is not needed to produce the stream)
exactly as ``sync_weights`` consumes it. Before each OffPrincipal sync the projected-factor cache is dropped, as an
optimizer step drops it in training, so its cost is counted.

Memory added by a sync:
- CPU: resident set size sampled by a thread from ``/proc/self/statm`` every 0.2 ms; the process runs with
  ``MALLOC_MMAP_THRESHOLD_=65536`` (set by re-executing itself) so freed large blocks go back to the OS and the peak
  is the sync's own; added = peak − RSS just before the sync.
- CUDA: ``torch.cuda.max_memory_allocated()`` during the sync − ``memory_allocated()`` before it.

Also: whether the base after the sync is bit-identical to before (LoRA's unmerge subtracts ΔW: its drift is shown),
the bytes of OffPrincipal's merge corrections while merged, and with ``--grpo-steps N`` the GRPO step time
(N steps of ``trainer.train()``, generation with transformers, no vLLM).

    .venv/bin/python benchmarks/sync_memory.py --out benchmarks/results/sync_memory_cpu.md
    python benchmarks/sync_memory.py --device cuda --model smollm2 --dtypes bf16 --grpo-steps 3 --out OUT.md
    .venv/bin/python benchmarks/sync_memory.py --model tiny --dtypes bf16 --grpo-steps 1 --out /tmp/smoke.md  # smoke
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import threading
import time

if __name__ == "__main__" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # glibc reads it at start: re-execute with it set
    os.execv(sys.executable, [sys.executable] + sys.argv)

import torch  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
METHODS = ("lora", "offprincipal")
CHARS = list("0123456789+-*=?:. abcdefghijklmnopqrstuvwxyz\n")
MODELS = {  # Llama-shaped models built from a config (no download); "smollm2" is the embedded real model
    "llama196": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4),
}


def char_tokenizer():
    """Character-level tokenizer with a chat template, built locally (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(specials + CHARS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.chat_template = ("{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}a:{% endif %}")
    return fast


def load_base(name: str, dtype: torch.dtype, device: str):
    if name == "smollm2":
        from offprincipal.experiment.models import load_model

        return load_model(None, dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(CHARS) + 4, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, tie_word_embeddings=True, **MODELS[name])
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval(), char_tokenizer()


def reward(completions, **kwargs):
    return [float(len(str(c)) % 7) for c in completions]  # varies inside a group, so the GRPO loss has a gradient


def build_trainer(method, model, tokenizer, args, dtype, out_dir):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from offprincipal import OffPrincipalConfig

    peft_config = (LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules="all-linear") if method == "lora"
                   else OffPrincipalConfig(r=args.r, alpha=2 * args.r, top_k=args.top_k, target_modules="all-linear"))
    prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": f"{i}+{i}="}]} for i in range(64)])
    config = GRPOConfig(
        output_dir=out_dir, per_device_train_batch_size=8, num_generations=8, max_completion_length=32,
        max_steps=max(args.grpo_steps, 1), learning_rate=1e-5, logging_steps=1, use_cpu=args.device == "cpu",
        bf16=dtype == torch.bfloat16 and args.device == "cuda", report_to=[], save_strategy="no",
        gradient_checkpointing=False, seed=0,
    )
    return GRPOTrainer(model=model, reward_funcs=reward, train_dataset=prompts, processing_class=tokenizer,
                       args=config, peft_config=peft_config)


def adapter_layers(model):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@torch.no_grad()
def set_delta(model, rel: float, seed: int = 0) -> None:
    """Give every adapter layer ΔW with RMS(ΔW) = rel · RMS(W0): B drawn at random, then rescaled."""
    gen = torch.Generator().manual_seed(seed)
    for layer in adapter_layers(model):
        B = (layer.lora_B if hasattr(layer, "lora_B") else layer.offprincipal_B)["default"].weight
        B.copy_(torch.randn(B.shape, generator=gen).to(B))
        if hasattr(layer, "clear_factor_cache"):
            layer.clear_factor_cache()
        rms = lambda t: t.float().pow(2).mean().sqrt()
        B.mul_(rel * rms(layer.get_base_layer().weight) / rms(layer.get_delta_weight("default")))
        if hasattr(layer, "clear_factor_cache"):
            layer.clear_factor_cache()


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler(threading.Thread):
    """Highest RSS seen while running (sampled every ``interval`` s)."""

    def __init__(self, interval: float = 2e-4):
        super().__init__(daemon=True)
        self.interval, self.peak, self._done = interval, rss_bytes(), threading.Event()

    def run(self):
        while not self._done.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def stop(self) -> int:
        self._done.set()
        self.join()
        self.peak = max(self.peak, rss_bytes())
        return self.peak


def measure_sync(trainer, device: str) -> dict:
    from offprincipal.integrations.trl import trl_weight_stream

    model = trainer.model
    layers = adapter_layers(model)
    for layer in layers:
        if hasattr(layer, "clear_factor_cache"):
            layer.clear_factor_cache()  # what the optimizer step before a sync does
    before = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    held = 0
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss_bytes()
        sampler = PeakSampler()
        sampler.start()
    t0 = time.perf_counter()
    for i, (name, tensor) in enumerate(trl_weight_stream(model, trainer.accelerator)):
        if i == 0:  # all layers are merged now
            held = sum(getattr(layer, "merge_correction_bytes", lambda: 0)() for layer in layers)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else sampler.stop()
    drift = max(float((layer.get_base_layer().weight.float() - w.float()).norm() / w.float().norm())
                for layer, w in zip(layers, before))
    exact = all(torch.equal(layer.get_base_layer().weight.view(torch.uint8), w.view(torch.uint8))
                for layer, w in zip(layers, before))
    for layer, w in zip(layers, before):  # the next sync starts from the same base for both methods
        layer.get_base_layer().weight.data.copy_(w)
    return dict(seconds=seconds, added=peak - base, held=held, exact=exact, drift=drift)


class StepTimer:
    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, *a, **k):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                timer.t0 = time.perf_counter()

            def on_step_end(self, *a, **k):
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                timer.steps.append(time.perf_counter() - timer.t0)

        self.steps, self.callback = [], _Callback()


def run(args) -> str:
    import tempfile

    from offprincipal.experiment.hardware import describe_device

    machine = describe_device(args.device)
    rows, bounds = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for dtype_name in args.dtypes:
            dtype = DTYPES[dtype_name]
            base, tokenizer = load_base(args.model, dtype, args.device)
            trainers = {m: build_trainer(m, copy.deepcopy(base), tokenizer, args, dtype, f"{scratch}/{m}")
                        for m in METHODS}
            del base
            steps = {}
            if args.grpo_steps:
                for method, trainer in trainers.items():
                    timer = StepTimer()
                    trainer.add_callback(timer.callback)
                    trainer.train()
                    steps[method] = timer.steps
            targeted = sum(l.get_base_layer().weight.numel() * l.get_base_layer().weight.element_size()
                           for l in adapter_layers(trainers["lora"].model))
            for rel in args.delta:
                results = {m: [] for m in METHODS}
                for repeat in range(args.repeats):
                    for method in (METHODS if repeat % 2 == 0 else METHODS[::-1]):
                        set_delta(trainers[method].model, rel)
                        results[method].append(measure_sync(trainers[method], args.device))
                worst = {m: max(r["added"] for r in rs) for m, rs in results.items()}
                bound = worst["lora"] + 0.15 * targeted
                bounds.append((dtype_name, rel, worst["offprincipal"] <= bound))
                for method, rs in results.items():
                    step = f"{statistics.median(steps[method]):.2f}" if steps.get(method) else "–"
                    rows.append(
                        f"| {dtype_name} | {rel:g} | {method} | {targeted / 2**20:.1f} | "
                        f"{statistics.median(r['seconds'] for r in rs):.3f} | {worst[method] / 2**20:.1f} | "
                        f"{worst[method] / targeted:.3f}× | {max(r['held'] for r in rs) / 2**20:.2f} | "
                        f"{'yes' if all(r['exact'] for r in rs) else 'no'} | {max(r['drift'] for r in rs):.1e} | {step} |"
                    )
            del trainers
            gc.collect()
    measure = ("torch.cuda.max_memory_allocated() during the sync − memory_allocated() before"
               if args.device == "cuda" else
               "peak RSS during the sync (thread sampling /proc/self/statm every 0.2 ms, MALLOC_MMAP_THRESHOLD_=65536)"
               " − RSS before")
    lines = [
        "# TRL vLLM weight sync: memory and time, OffPrincipal vs LoRA",
        "",
        f"Machine: {machine}; torch {torch.__version__}, {torch.get_num_threads()} torch thread(s). "
        f"Command: `benchmarks/sync_memory.py {' '.join(sys.argv[1:])}`.",
        f"Model `{args.model}`, adapters r = {args.r} (OffPrincipal top_k = {args.top_k}) on all linear layers, built "
        "by TRL's `GRPOTrainer(peft_config=...)`; the sync is TRL's own `VLLMGeneration._iter_named_params` "
        f"(merge, yield every weight, unmerge) consumed as `sync_weights` does; {args.repeats} syncs per method, "
        "alternating order. ΔW: RMS per entry = `ΔW rel` × RMS(W0).",
        f"Added memory = {measure}; worst over the syncs. `held` = OffPrincipal's merge corrections while merged "
        "(LoRA keeps none). `exact` = base bit-identical after the sync; `drift` = max ‖W_after − W0‖/‖W0‖.",
        "",
        "| dtype | ΔW rel | method | targeted weights (MiB) | sync (s) | added memory (MiB) | × targeted | held (MiB) "
        "| exact | drift | GRPO step (s) |",
        "|---|---|---|---:|---:|---:|---:|---:|---|---:|---:|",
        *rows,
        "",
        "Bound (OffPrincipal added ≤ LoRA added + 0.15 × targeted weights): "
        + ", ".join(f"{d} ΔW {r:g}: {'holds' if ok else 'FAILS'}" for d, r, ok in bounds) + ".",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama196", choices=[*MODELS, "smollm2"])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--delta", nargs="+", type=float, default=[1e-3, 1e-2], help="RMS(ΔW)/RMS(W0) per entry")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--grpo-steps", type=int, default=0, help="time N GRPO steps per method first (0: none)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    from offprincipal.files import write_text_atomic

    report = run(args)
    write_text_atomic(args.out, report)
    print(report)


if __name__ == "__main__":
    main()
