"""Subspace-bank benchmark: time and quality (captured spectral energy) of top-k bases for whole models.

- ``--model llama7b`` (for a GPU): a Llama-7B-shaped model, 32 layers × (q, k, v, o 4096×4096; gate, up 11008×4096;
  down 4096×11008) = 224 matrices, k = 64, randomized SVD with oversample 32 and 8 power iterations (the target's
  configuration) and with the subspace bank's defaults. Weights are
  synthetic with a power-law spectrum σ_i = i^-½ (random singular vectors); one matrix per distinct shape is
  reused for every layer, since the cost depends only on the shape. Target: ≤ 5 s for the model on one GPU at
  captured energy ≥ 0.999.
- ``--model smollm2`` (default on CPU): the embedded SmolLM2-135M-Instruct (``offprincipal.experiment.models.load_model``),
  its 210 linear weights; ``--model smollm2-random`` builds a random model with the same LlamaConfig shapes
  (hidden 576, 30 layers, 9/3 heads, intermediate 1536) instead. Exact fp32 SVD (one by one and batched by
  shape) vs randomized with several (oversample, power iterations), k = 32 and 64.

Captured energy = ‖U_kᵀ W V_k‖_F² / Σ_{i≤k} σ_i² (1.0 = exact), see ``offprincipal.subspace.captured_energy``.

    python benchmarks/subspaces.py                         # cuda → llama7b, cpu → smollm2
    python benchmarks/subspaces.py --device cpu --model smollm2-random --ks 32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from offprincipal.subspace import DEFAULT_NITER, DEFAULT_OVERSAMPLE, captured_energy, compute_subspaces
from offprincipal.files import write_text_atomic
from offprincipal.experiment.hardware import describe_device

LLAMA7B_LAYER = [("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096), ("o_proj", 4096, 4096),
                 ("gate_proj", 11008, 4096), ("up_proj", 11008, 4096), ("down_proj", 4096, 11008)]
TARGET_SECONDS = 5.0
TARGET_ENERGY = 0.999


def power_law_matrix(m: int, n: int, device: str, gen: torch.Generator) -> torch.Tensor:
    """W = Q₁ diag(i^-½) Q₂ᵀ with random orthonormal Q₁ (m×p), Q₂ (n×p), p = min(m, n)."""
    p = min(m, n)
    Q1 = torch.linalg.qr(torch.randn(m, p, generator=gen).to(device)).Q
    Q2 = torch.linalg.qr(torch.randn(n, p, generator=gen).to(device)).Q
    sigma = torch.arange(1, p + 1, device=device, dtype=torch.float32) ** -0.5
    return (Q1 * sigma) @ Q2.T


def llama7b_weights(device: str, scale: int = 1) -> dict[str, torch.Tensor]:
    """224 matrices named like a Llama-7B's (dimensions divided by ``scale``, for trying the script on a CPU)."""
    gen = torch.Generator().manual_seed(0)
    shapes = {name: (m // scale, n // scale) for name, m, n in LLAMA7B_LAYER}
    shared = {shape: power_law_matrix(*shape, device, gen) for shape in set(shapes.values())}
    return {f"layers.{i}.{name}.weight": shared[shape] for i in range(32) for name, shape in shapes.items()}


def smollm2_random_model():
    """A randomly initialised LlamaForCausalLM with SmolLM2-135M's shapes (for when the real model is not wanted)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


def linear_weights(model) -> dict[str, torch.Tensor]:
    """The 2-D weights of the decoder layers (embeddings and the tied head excluded)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.ndim == 2 and "embed" not in name
            and "lm_head" not in name}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_bases(weights, k: int, method: str, oversample: int, niter: int, device: str, batch_exact: bool = False):
    sync(device)
    t0 = time.perf_counter()
    subs = compute_subspaces(weights, k, method=method, oversample=oversample, niter=niter, cache_dir=False,
                             progress=False, batch_exact=batch_exact)
    sync(device)
    return subs, time.perf_counter() - t0


def energies(weights, subs, names) -> list[float]:
    return [captured_energy(weights[name], subs[name]) for name in names]




def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", choices=["llama7b", "smollm2", "smollm2-random"], default=None)
    parser.add_argument("--ks", default=None, help="comma-separated k (default 64 for llama7b, 32,64 for smollm2)")
    parser.add_argument("--randomized", default=None,
                        help="randomized SVD settings as oversample:niter pairs (default 32:8 and the bank's defaults; "
                             "on smollm2 also 32:2, 32:4, 64:8)")
    parser.add_argument("--scale", type=int, default=1, help="llama7b only: divide its dimensions (CPU trial runs)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    device = args.device
    model_name = args.model or ("llama7b" if device == "cuda" else "smollm2")
    if args.threads:
        torch.set_num_threads(args.threads)
    if model_name == "llama7b":
        ks = [int(k) for k in (args.ks or "64").split(",")]
        pairs = args.randomized or f"32:8,{DEFAULT_OVERSAMPLE}:{DEFAULT_NITER}"
        weights = llama7b_weights(device, args.scale)
        quality_names = [f"layers.0.{name}.weight" for name in ("q_proj", "gate_proj", "down_proj")]
        source = "Llama-7B-shaped" + (f" / {args.scale}" if args.scale > 1 else "") + ", synthetic power-law spectrum σ_i = i^-½"
    else:
        ks = [int(k) for k in (args.ks or "32,64").split(",")]
        pairs = args.randomized or f"32:2,32:4,32:8,64:8,{DEFAULT_OVERSAMPLE}:{DEFAULT_NITER}"
        if model_name == "smollm2":
            from offprincipal.experiment.models import load_model

            model = load_model()[0]
            source = "SmolLM2-135M-Instruct (embedded, real weights)"
        else:
            model = smollm2_random_model()
            source = "random model with SmolLM2-135M's shapes"
        weights = {name: w.to(device) for name, w in linear_weights(model).items()}
        del model
        quality_names = list(weights)
    randomized = [("randomized", *(int(x) for x in pair.split(":"))) for pair in pairs.split(",")]
    methods = ([] if model_name == "llama7b" else [("exact", 0, 0), ("exact-batched", 0, 0)]) + randomized
    name = describe_device(device)
    print(f"{source}: {len(weights)} matrices on {name}", flush=True)

    rows = ["| k | method | total s | ms / matrix | captured energy: min | median |", "|---|---|---|---|---|---|"]
    summary = {}
    for k in ks:
        for method, oversample, niter in methods:
            label = method if method.startswith("exact") else f"randomized, oversample={oversample}, niter={niter}"
            subs, seconds = timed_bases(weights, k, "exact" if method.startswith("exact") else method, oversample, niter,
                                        device, batch_exact=method == "exact-batched")
            e = energies(weights, subs, quality_names)
            rows.append(f"| {k} | {label} | {seconds:.2f} | {1e3 * seconds / len(weights):.1f} | {min(e):.5f} | "
                        f"{statistics.median(e):.5f} |")
            summary[(k, label)] = (seconds, min(e))
            print(rows[-1], flush=True)

    out = [f"# Subspace bank benchmark on {name}", "",
           f"torch {torch.__version__}, Python {sys.version.split()[0]}, {torch.get_num_threads()} torch thread(s).",
           f"Model: {source}; {len(weights)} matrices. Randomized SVD: QR after every product, seed 0; the bank's "
           f"defaults are oversample={DEFAULT_OVERSAMPLE}, niter={DEFAULT_NITER}. "
           f"Captured energy over {'all matrices' if len(quality_names) == len(weights) else ', '.join(quality_names)}.",
           ""] + rows + [""]
    if model_name == "llama7b" and (64, "randomized, oversample=32, niter=8") in summary:
        seconds, energy = summary[(64, "randomized, oversample=32, niter=8")]
        out += [f"Target (one GPU, k=64): ≤ {TARGET_SECONDS} s at energy ≥ {TARGET_ENERGY}: {seconds:.2f} s, "
                f"min energy {energy:.5f} — {'met' if seconds <= TARGET_SECONDS and energy >= TARGET_ENERGY else 'NOT met'}.", ""]
    report = "\n".join(out)
    print(report)
    tag = f"{model_name}_{'cuda' if device == 'cuda' else 'cpu'}"
    path = Path(args.out) if args.out else Path(__file__).parent / "results" / f"subspaces_{tag}.md"
    write_text_atomic(path, report + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
