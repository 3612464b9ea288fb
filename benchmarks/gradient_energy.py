"""Where a first gradient's energy lies relative to the top-k principal subspaces of W0 (SmolLM2, CPU).

OffPrincipal keeps only P(G) = (I − UUᵀ) G (I − VVᵀ) of an update direction G of a weight W0 (m×n) with top-k
singular bases U (m×k), V (n×k). This script measures, for every linear weight of the model (all-linear: q, k, v,
o, gate, up, down of each decoder layer), what share of a gradient's squared Frobenius norm ("energy") lies

    e_left  = ‖UᵀG‖²/‖G‖²          on the principal output directions   (random m×n matrix: k/m)
    e_right = ‖G V‖²/‖G‖²          on the principal input directions    (random: k/n)
    e_kept  = ‖P(G)‖²/‖G‖²         off both, what OffPrincipal keeps    (random: (1 − k/m)(1 − k/n))

(:func:`energy_fractions`; the projection is :func:`offprincipal.projection.project`), for two gradients taken at
the untouched model on the same P arithmetic training prompts:

1. GRPO at step 0, as the RLVR benchmark trains (TRL's defaults there): G sampled completions per prompt
   (temperature, top_k = 0, top_p = 1), rewards = the task's reward functions with its reward weights,
   group-normalised advantages (r − mean)/(std + 1e-4) (unbiased std, as TRL), token log-probs of the
   temperature-scaled logits, loss = −Σ adv · (sum of the completion's token log-probs) / (all completion tokens)
   (TRL's "dapo" aggregation; at step 0 the importance ratio is 1 and the KL term has zero gradient);
2. SFT: mean token NLL of the reference answers, given as the assistant turn in the same chat format (the
   completion tokens of the templated conversation, as TRL's SFTTrainer with completion-only loss).

It also reports the LoRA view at init (B = 0, A Kaiming-uniform as PEFT draws it, rank r, seeded): LoRA's first
B-gradient is (scale ·) G·Aᵀ, and ``lora_left`` = ‖Uᵀ G Aᵀ‖²/‖G Aᵀ‖² is the share of it on the principal output
directions (random: k/m).

    .venv/bin/python benchmarks/gradient_energy.py          # writes benchmarks/results/gradient_energy_smollm2_cpu.md
    .venv/bin/python benchmarks/gradient_energy.py --prompts 4 --model path/to/model --top-k 8 --out /tmp/x.md
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import re
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional

import torch

from offprincipal.files import write_text_atomic
from offprincipal.experiment.hardware import describe_device
from offprincipal.projection import principal_leak, project

DEFAULT_OUT = Path(__file__).parent / "results" / "gradient_energy_smollm2_cpu.md"
FRACTIONS = ("e_left", "e_right", "e_kept", "lora_left")


# --- the math ------------------------------------------------------------------------------------------------------


def energy_fractions(G: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> dict[str, float]:
    """Shares of ‖G‖_F² (G: m×n) on the principal subspaces of bases U (m×k), V (n×k), orthonormal columns, in fp64:

    ``e_left`` = ‖UᵀG‖²/‖G‖², ``e_right`` = ‖GV‖²/‖G‖², ``e_kept`` = ‖(I − UUᵀ)G(I − VVᵀ)‖²/‖G‖² (what the
    two-sided projection keeps), and the expectations of the three for a Gaussian random G:
    ``base_left`` = k/m, ``base_right`` = k/n, ``base_kept`` = (1 − k/m)(1 − k/n). A zero G gives NaN fractions.
    """
    m, n = G.shape
    k = U.shape[1]
    G64 = G.detach().to(torch.float64)
    total = float(torch.linalg.matrix_norm(G64)) ** 2
    base = {"base_left": k / m, "base_right": k / n, "base_kept": (1 - k / m) * (1 - k / n)}
    if total == 0:
        return {"e_left": math.nan, "e_right": math.nan, "e_kept": math.nan, **base}
    left, right = principal_leak(G64, U, V)
    kept = float(torch.linalg.matrix_norm(project(G64, U.to(G64), V.to(G64), "both"))) ** 2 / total
    return {"e_left": left**2, "e_right": right**2, "e_kept": kept, **base}


def left_fraction(X: torch.Tensor, U: torch.Tensor) -> float:
    """‖UᵀX‖²/‖X‖² (NaN for a zero X)."""
    left, _ = principal_leak(X, U, None)
    return left**2 if float(X.detach().abs().max()) > 0 else math.nan


def lora_a(r: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """LoRA's A (r×n) as PEFT initialises it: ``kaiming_uniform_(a=√5)``, i.e. U(−b, b) with b = 1/√n."""
    bound = 1.0 / math.sqrt(n)  # gain √(2/(1+5)) · √(3/n)
    return (torch.rand(r, n, generator=generator, dtype=torch.float64) * 2 - 1) * bound


# --- the model's gradients -----------------------------------------------------------------------------------------


def linear_modules(model) -> dict[str, torch.nn.Module]:
    """The linear layers of the decoder (every ``nn.Linear``/``Conv1D`` except the output head)."""
    from transformers.pytorch_utils import Conv1D

    return {name: module for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D)) and not name.endswith("lm_head")}


def grad_matrix(module) -> torch.Tensor:
    """The gradient of the module's weight in (out, in) orientation (as :func:`weight_matrix`); zeros when no
    backward reached it (e.g. every GRPO group had zero advantage)."""
    from offprincipal.subspace import weight_matrix

    grad = module.weight.grad if module.weight.grad is not None else torch.zeros_like(module.weight)
    transposed = weight_matrix(module) is not module.weight
    return (grad.T if transposed else grad).detach().clone()


def kind_of(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def layer_of(name: str) -> Optional[int]:
    match = re.search(r"\.(\d+)\.", name)
    return int(match.group(1)) if match else None


def _eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])


def prompt_ids(tokenizer, prompt) -> list[int]:
    text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def sample_group(model, tokenizer, ids: list[int], group: int, temperature: float, max_new_tokens: int) -> list[list[int]]:
    """``group`` sampled completions (token ids through the first end-of-sequence token, kept) of one prompt."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = _eos_ids(model, tokenizer)
    inputs = torch.tensor([ids] * group)
    with torch.inference_mode():
        out = model.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), do_sample=True,
                             temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                             pad_token_id=pad_id)
    completions = []
    for row in out[:, len(ids):].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in eos), len(row))
        completions.append(row[:end])
    return completions


def rewards(task, completions: list[str], answers: list[str]) -> list[float]:
    """The task's rewards, weighted as GRPOTrainer weights them (``task.reward_funcs`` × ``task.reward_weights``)."""
    conversational = [[{"role": "assistant", "content": text}] for text in completions]
    total = [0.0] * len(completions)
    for func, weight in zip(task.reward_funcs, task.reward_weights):
        for i, value in enumerate(func(conversational, answer=answers)):
            total[i] += weight * value
    return total


def completion_logprob_sums(model, ids: list[int], completions: list[list[int]], pad_id: int, temperature: float):
    """Per completion: the sum of its token log-probs under the temperature-scaled logits, and its length."""
    length = max(len(c) for c in completions)
    rows = [ids + c + [pad_id] * (length - len(c)) for c in completions]
    mask = torch.tensor([[1] * len(c) + [0] * (length - len(c)) for c in completions], dtype=torch.float32)
    input_ids = torch.tensor(rows)
    attention = torch.cat([torch.ones(len(rows), len(ids), dtype=torch.long), mask.long()], dim=1)
    logits = model(input_ids=input_ids, attention_mask=attention, logits_to_keep=length + 1).logits[:, :-1]
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    token_logp = logp.gather(-1, input_ids[:, len(ids):, None]).squeeze(-1)
    return (token_logp * mask).sum(dim=1), mask.sum(dim=1)


def grpo_gradient(model, tokenizer, task, rows, args) -> dict:
    """Accumulates the step-0 GRPO gradient into ``.grad``; returns what was sampled and rewarded."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(args.seed)
    groups = []
    t0 = time.perf_counter()
    for row in rows:
        ids = prompt_ids(tokenizer, row["prompt"])
        completions = sample_group(model, tokenizer, ids, args.group, args.temperature, args.max_new_tokens)
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        r = torch.tensor(rewards(task, texts, [row["answer"]] * len(texts)), dtype=torch.float64)
        adv = (r - r.mean()) / (r.std() + 1e-4)
        groups.append({"ids": ids, "completions": completions, "rewards": r, "adv": adv})
    t1 = time.perf_counter()
    total_tokens = sum(len(c) for g in groups for c in g["completions"])
    for g in groups:
        if not bool((g["adv"] != 0).any()):
            continue  # every completion rewarded alike: zero advantage, no gradient
        sums, _ = completion_logprob_sums(model, g["ids"], g["completions"], pad_id, args.temperature)
        loss = -(g["adv"].to(sums) * sums).sum() / total_tokens
        loss.backward()
    t2 = time.perf_counter()
    all_r = torch.cat([g["rewards"] for g in groups])
    return {
        "mean_reward": float(all_r.mean()),
        "informative_groups": sum(bool((g["adv"] != 0).any()) for g in groups),
        "completion_tokens": total_tokens,
        "mean_completion_tokens": total_tokens / len(all_r),
        "sample_s": t1 - t0, "backward_s": t2 - t1,
    }


def sft_gradient(model, tokenizer, rows) -> dict:
    """Accumulates the SFT gradient (mean NLL of the reference answers' tokens) into ``.grad``."""
    examples = []
    for row in rows:
        prompt_text = tokenizer.apply_chat_template(list(row["prompt"]), add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(
            list(row["prompt"]) + [{"role": "assistant", "content": row["answer"]}], tokenize=False)
        if not full.startswith(prompt_text):
            raise ValueError("the chat template does not extend the prompt with the assistant turn; cannot split it")
        ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        completion = tokenizer(full[len(prompt_text):], add_special_tokens=False)["input_ids"]
        examples.append((ids, completion))
    total_tokens = sum(len(c) for _, c in examples)
    t0 = time.perf_counter()
    for ids, completion in examples:
        sums, _ = completion_logprob_sums(model, ids, [completion], 0, 1.0)
        (-sums.sum() / total_tokens).backward()
    return {"completion_tokens": total_tokens, "backward_s": time.perf_counter() - t0}


def fractions_of(modules, subspaces, lora_As) -> dict[str, dict]:
    out = {}
    for name, module in modules.items():
        G = grad_matrix(module)
        sub = subspaces[name]
        record = energy_fractions(G, sub.U, sub.V)
        record["lora_left"] = left_fraction(G.to(torch.float64) @ lora_As[name].T, sub.U)
        # as norm ratios, the form of the benchmarks' "principal leak" (max of the two sides, per weight)
        record["leak_max"] = math.sqrt(max(record["e_left"], record["e_right"]))
        record["base_leak_max"] = math.sqrt(max(record["base_left"], record["base_right"]))
        record["params"] = G.numel()
        record["energy"] = float(G.double().pow(2).sum())
        record["shape"] = tuple(G.shape)
        out[name] = record
    return out


# --- summaries -----------------------------------------------------------------------------------------------------


def summarize(records: dict[str, dict], names: list[str]) -> dict[str, float]:
    """Plain and parameter-weighted means of each fraction and its baseline over ``names``, and the pooled shares
    (Σ of each weight's energy in the part / Σ of the energies: the share of the whole gradient's energy)."""
    finite = [n for n in names if not math.isnan(records[n]["e_kept"])]
    out = {"weights": len(names), "finite": len(finite)}
    keys = FRACTIONS + ("base_left", "base_right", "base_kept", "leak_max", "base_leak_max")
    for key in keys:
        vals = [(records[n][key], records[n]["params"], records[n]["energy"]) for n in finite]
        if not vals:
            out[f"plain_{key}"] = out[f"param_{key}"] = out[f"pooled_{key}"] = math.nan
            continue
        out[f"plain_{key}"] = sum(v for v, _, _ in vals) / len(vals)
        out[f"param_{key}"] = sum(v * p for v, p, _ in vals) / sum(p for _, p, _ in vals)
        energy = sum(e for _, _, e in vals)
        out[f"pooled_{key}"] = sum(v * e for v, _, e in vals) / energy if energy > 0 else math.nan
    return out


def fmt(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x:.3f}"


def table(records: dict[str, dict], kinds: dict[str, list[str]], mean: str) -> list[str]:
    header = ("| weights | n | shape (m×n) | e_left | random k/m | e_right | random k/n | e_kept | random "
              "(1−k/m)(1−k/n) | e_kept / random | LoRA B-grad left | random k/m |")
    lines = [header, "|" + "---|" * 12]

    def row(label, names, shape):
        s = summarize(records, names)
        ratio = s[f"{mean}_e_kept"] / s[f"{mean}_base_kept"]
        lines.append(
            f"| {label} | {s['finite']} | {shape} | {fmt(s[f'{mean}_e_left'])} | {fmt(s[f'{mean}_base_left'])} | "
            f"{fmt(s[f'{mean}_e_right'])} | {fmt(s[f'{mean}_base_right'])} | **{fmt(s[f'{mean}_e_kept'])}** | "
            f"{fmt(s[f'{mean}_base_kept'])} | {fmt(ratio)} | {fmt(s[f'{mean}_lora_left'])} | "
            f"{fmt(s[f'{mean}_base_left'])} |")

    for kind, names in kinds.items():
        shapes = sorted({records[n]["shape"] for n in names})
        row(kind, names, ", ".join(f"{m}×{n}" for m, n in shapes))
    row("**all**", [n for names in kinds.values() for n in names], "")
    return lines


def layer_bands(records_by_grad: dict[str, dict[str, dict]], n_layers: int, bands: int = 3) -> list[str]:
    size = max(1, math.ceil(n_layers / bands))
    lines = ["| layers | " + " | ".join(f"{g} e_kept (param-weighted)" for g in records_by_grad) + " | random |",
             "|---|" + "---|" * (len(records_by_grad) + 1)]
    for start in range(0, n_layers, size):
        stop = min(n_layers, start + size)
        cells, base = [], math.nan
        for records in records_by_grad.values():
            names = [n for n in records if layer_of(n) is not None and start <= layer_of(n) < stop]
            s = summarize(records, names)
            cells.append(fmt(s["param_e_kept"]))
            base = s["param_base_kept"]
        lines.append(f"| {start}–{stop - 1} | " + " | ".join(cells) + f" | {fmt(base)} |")
    return lines


def pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"


def reading(summary: dict[str, dict[str, float]], records: dict[str, dict[str, dict]], k: int) -> str:
    """One paragraph computed from the numbers (no fixed conclusions)."""
    rl, sft = summary["GRPO"], summary["SFT"]
    parts = []
    for label, s in (("RL (GRPO step 0)", rl), ("SFT", sft)):
        removed, random_removed = 1 - s["param_e_kept"], 1 - s["param_base_kept"]
        pooled = 1 - s["pooled_e_kept"]
        parts.append(
            f"For the {label} gradient the projection removes {pct(removed)} of the energy (parameter-weighted mean "
            f"over the weights; {pct(pooled)} of the whole gradient's energy pooled over the weights) against "
            f"{pct(random_removed)} for a random matrix of the same shapes ({removed / random_removed:.2f}× the "
            f"random share, {100 * (removed - random_removed):+.1f} points).")
    diff = (1 - rl["param_e_kept"]) - (1 - sft["param_e_kept"])
    both = [n for n in records["GRPO"] if not math.isnan(records["GRPO"][n]["e_kept"] + records["SFT"][n]["e_kept"])]
    rl_more = sum(records["GRPO"][n]["e_kept"] < records["SFT"][n]["e_kept"] for n in both)
    parts.append(
        f"RL against SFT: {pct(1 - rl['param_e_kept'])} against {pct(1 - sft['param_e_kept'])} removed (RL minus SFT "
        f"{100 * diff:+.1f} points); weight by weight the projection removes more of the RL gradient than of the SFT "
        f"gradient in {rl_more} of {len(both)} weights.")
    for label, s in (("RL", rl), ("SFT", sft)):
        left_x = s["param_e_left"] / s["param_base_left"]
        right_x = s["param_e_right"] / s["param_base_right"]
        parts.append(
            f"{label}: {pct(s['param_e_left'])} of the energy lies on the top-{k} output directions "
            f"({left_x:.1f}× random) and {pct(s['param_e_right'])} on the top-{k} input directions ({right_x:.1f}× "
            f"random).")
    by_kind = {g: {kind: summarize(records[g], names)["param_e_kept"] for kind, names in kinds_of(records[g]).items()}
               for g in records}
    for g in ("GRPO", "SFT"):
        ranked = sorted(((v, kind) for kind, v in by_kind[g].items() if not math.isnan(v)))
        if ranked:
            parts.append(f"{g}: the projection keeps least of {ranked[0][1]} ({pct(ranked[0][0])} kept) and most of "
                         f"{ranked[-1][1]} ({pct(ranked[-1][0])}).")
    parts.append(
        f"As norm ratios (the form of the benchmarks' principal leak, max(‖UᵀG‖, ‖GV‖)/‖G‖ per weight, plain mean): RL "
        f"{fmt(rl['plain_leak_max'])}, SFT {fmt(sft['plain_leak_max'])}, random {fmt(rl['plain_base_leak_max'])}.")
    lora = rl["param_lora_left"]
    parts.append(
        f"LoRA's first B-gradient G·Aᵀ under the RL gradient puts {pct(lora)} of its energy on the principal output "
        f"directions (random {pct(rl['param_base_left'])}; the full gradient G: {pct(rl['param_e_left'])}).")
    return " ".join(parts)


def kinds_of(records: dict[str, dict]) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = defaultdict(list)
    for name in records:
        kinds[kind_of(name)].append(name)
    return dict(kinds)


# --- main ----------------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--task", default="arithmetic")
    p.add_argument("--format-weight", type=float, default=0.0,
                   help="the task's format-reward weight (the RLVR benchmark's task: 0, correctness only)")
    p.add_argument("--prompts", type=int, default=8, help="training prompts P")
    p.add_argument("--group", type=int, default=8, help="sampled completions per prompt")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--rank", type=int, default=16, help="LoRA rank for the LoRA view")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    machine = describe_device("cpu")
    start = time.perf_counter()

    from offprincipal.experiment.models import load_model
    from offprincipal.subspace import compute_subspaces, weight_matrix
    from offprincipal.experiment.tasks import get_task

    model, tokenizer = load_model(args.model, dtype=torch.float32)
    model.eval()
    modules = linear_modules(model)
    for p in model.parameters():
        p.requires_grad_(False)
    for module in modules.values():
        module.weight.requires_grad_(True)
    t0 = time.perf_counter()
    subspaces = compute_subspaces({n: weight_matrix(m).detach() for n, m in modules.items()}, args.top_k, progress=False)
    subspace_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(args.seed)
    lora_As = {n: lora_a(args.rank, weight_matrix(m).shape[1], gen) for n, m in modules.items()}

    task_kwargs = {"format_weight": args.format_weight} if args.format_weight else {}
    task = get_task(args.task, **task_kwargs)
    train = task.rows("train")
    rows = random.Random(args.seed).sample(train, min(args.prompts, len(train)))

    grpo = grpo_gradient(model, tokenizer, task, rows, args)
    records = {"GRPO": fractions_of(modules, subspaces, lora_As)}
    model.zero_grad(set_to_none=True)
    sft = sft_gradient(model, tokenizer, rows)
    records["SFT"] = fractions_of(modules, subspaces, lora_As)
    model.zero_grad(set_to_none=True)
    wall = time.perf_counter() - start

    all_names = {g: list(r) for g, r in records.items()}
    summary = {g: summarize(records[g], all_names[g]) for g in records}
    n_layers = 1 + max((layer_of(n) for n in modules if layer_of(n) is not None), default=0)
    model_name = args.model or "the embedded SmolLM2-135M-Instruct (`offprincipal.experiment.models.load_model()`)"
    reward_desc = " + ".join(f"{w:g}·{f.__name__}" for f, w in zip(task.reward_funcs, task.reward_weights))
    lines = [
        f"# Gradient energy on and off the principal subspaces ({len(modules)} weights, k = {args.top_k})",
        "",
        "Written by `benchmarks/gradient_energy.py` (module docstring: definitions). For each linear weight W0 (m×n) "
        f"with its exact top-{args.top_k} singular bases U, V: e_left = ‖UᵀG‖²/‖G‖², e_right = ‖GV‖²/‖G‖², "
        "e_kept = ‖(I−UUᵀ)G(I−VVᵀ)‖²/‖G‖² (the share OffPrincipal keeps, 1 − e_kept the share its projection removes), "
        "beside their expectations for a Gaussian random matrix. LoRA B-grad left = ‖UᵀGAᵀ‖²/‖GAᵀ‖², the share of LoRA's "
        f"first B-gradient (B = 0, A Kaiming-uniform, r = {args.rank}) on the principal output directions.",
        "",
        f"Machine: {machine}; {torch.get_num_threads()} torch thread(s); torch {torch.__version__}, Python "
        f"{platform.python_version()}. Model: {model_name}, fp32. Wall time {wall:.0f} s (subspaces {subspace_s:.1f} s, "
        f"sampling {grpo['sample_s']:.0f} s, GRPO backward {grpo['backward_s']:.0f} s, SFT backward "
        f"{sft['backward_s']:.0f} s).",
        "",
        f"Settings: task `{args.task}`, {len(rows)} training prompts drawn with seed {args.seed} (random.Random(seed)"
        f".sample of the train split); GRPO: {args.group} completions per prompt, temperature {args.temperature:g}, "
        f"top_k 0, top_p 1, at most {args.max_new_tokens} new tokens, torch seed {args.seed}; reward {reward_desc}; "
        "advantages (r − mean)/(std + 1e-4) per group; loss −Σ adv·Σ log p / (all completion tokens), log-probs of "
        "the temperature-scaled logits. SFT: mean NLL of the reference answers' tokens in the same chat format. "
        f"LoRA A seed {args.seed}.",
        "",
        f"Step 0 of GRPO: mean reward {grpo['mean_reward']:.3f}; {grpo['informative_groups']} of {len(rows)} groups had "
        f"rewards that differ (the others have zero advantage and no gradient); {grpo['completion_tokens']} completion "
        f"tokens ({grpo['mean_completion_tokens']:.1f} per completion). SFT: {sft['completion_tokens']} answer tokens.",
        "",
    ]
    if grpo["informative_groups"] == 0:
        lines += ["**No group had differing rewards: the GRPO gradient is zero and its fractions are undefined "
                  "(n/a).** Use more prompts (`--prompts`) or another seed.", ""]
    for g, label in (("GRPO", "RL: GRPO policy gradient at step 0"), ("SFT", "SFT: NLL of the reference answers")):
        kinds = kinds_of(records[g])
        for mean, mean_label in (("plain", "plain means over the weights"),
                                 ("param", "parameter-weighted means (weights m·n)")):
            lines += [f"## {label} — {mean_label}", "", *table(records[g], kinds, mean), ""]
        s = summary[g]
        lines += [
            f"Pooled over all weights (each share weighted by that weight's ‖G‖², i.e. shares of the whole "
            f"gradient's energy): e_left {fmt(s['pooled_e_left'])}, e_right {fmt(s['pooled_e_right'])}, "
            f"**e_kept {fmt(s['pooled_e_kept'])}**, LoRA B-grad left {fmt(s['pooled_lora_left'])}.",
            "",
        ]
    lines += ["## e_kept by depth", "", *layer_bands(records, n_layers), ""]
    if all(summary[g]["finite"] for g in summary):
        lines += ["## Reading (computed from the numbers above by the script)", "", reading(summary, records, args.top_k), ""]
    lines += [f"Reproduce: `.venv/bin/python benchmarks/gradient_energy.py --prompts {args.prompts} --seed {args.seed}`."]
    write_text_atomic(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))
    return args.out


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
