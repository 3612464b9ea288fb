"""Markdown + PNG reports of the paper's parameter-level metrics and of training runs.

Shared by ``offprincipal train`` (which appends a training section: reward curve, held-out accuracy before and
after) and ``offprincipal analyze`` (parameter metrics between two checkpoints). The metrics themselves come from
:mod:`offprincipal.metrics` (``compare_weights``); this module only lays them out:

- per-layer line plots (x = decoder layer index, one line per module kind such as ``q_proj``) of NSS, max principal
  angle (left and right), bf16 update sparsity and the update's overlap with the principal-weight and
  low-magnitude masks (with the random baseline α);
- tables per module kind (means over layers) and per weight;
- ``layers.jsonl`` (one :class:`~offprincipal.metrics.LayerRecord` per line) and ``summary.json``.

Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

from ..files import to_json, write_json, write_text_atomic
from ..metrics import LayerRecord

PLOTS = "plots"
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported lazily: only reports need it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# --- layout helpers ---------------------------------------------------------------------------------------------


def layer_position(name: str) -> tuple[int, str]:
    """(decoder layer index, module kind) of a weight name: ``model.layers.3.self_attn.q_proj`` → (3, "q_proj").
    Names without an index get -1."""
    match = _LAYER_INDEX.search(name)
    return (int(match.group(1)) if match else -1), name.rsplit(".", 1)[-1]


def _by_kind(records: Sequence[LayerRecord]) -> dict[str, list[LayerRecord]]:
    """Records grouped by module kind, each group sorted by layer index (kinds in first-seen order)."""
    groups: dict[str, list[LayerRecord]] = defaultdict(list)
    for record in records:
        groups[layer_position(record.name)[1]].append(record)
    return {kind: sorted(group, key=lambda r: layer_position(r.name)[0]) for kind, group in groups.items()}


def _fmt(value, digits: int = 4) -> str:
    """A compact number for tables (``n/a`` for None/NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}g}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A markdown table: ``header`` cells, then one line per row; strings are written as they are, other values
    through ``_fmt`` (4 significant digits; ``n/a`` for None/NaN)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows]
    return "\n".join(lines)


# old private names, still imported by benchmarks/rlvr_report.py (to be switched to pyplot / markdown_table)
_pyplot = pyplot
_table = markdown_table


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


# --- plots ------------------------------------------------------------------------------------------------------


def plot_per_layer(
    records: Sequence[LayerRecord],
    metrics: Mapping[str, Callable[[LayerRecord], float]],
    path: Path,
    ylabel: str,
    baseline: Optional[float] = None,
) -> Path:
    """One panel per entry of ``metrics`` (title → value of a record), one line per module kind over layer index."""
    plt = pyplot()
    groups = _by_kind(records)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 3.8), squeeze=False)
    for ax, (title, value) in zip(axes[0], metrics.items()):
        for kind, group in groups.items():
            ax.plot([layer_position(r.name)[0] for r in group], [value(r) for r in group], marker=".", label=kind)
        if baseline is not None:
            ax.axhline(baseline, color="gray", linestyle="--", linewidth=1, label="random baseline")
        ax.set(title=title, xlabel="layer", ylabel=ylabel)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize="small", loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def reward_blocks(values: Sequence[float], per_block: int) -> list[tuple[int, float, float]]:
    """Consecutive blocks of ``per_block`` steps: (last step of the block, mean, standard error over its steps; 0.0
    for a block of one). Steps are numbered from 1; a last, shorter block is kept."""
    blocks = []
    for start in range(0, len(values), per_block):
        chunk = values[start : start + per_block]
        mean = _mean(chunk)
        se = math.sqrt(sum((v - mean) ** 2 for v in chunk) / (len(chunk) - 1) / len(chunk)) if len(chunk) > 1 else 0.0
        blocks.append((start + len(chunk), mean, se))
    return blocks


def plot_training_curve(log_records: Sequence[Mapping], path: Path, prompts_per_step: int = 1,
                        prompts_per_point: int = 8) -> Optional[Path]:
    """Reward (GRPO) or loss (SFT) per step, faint, and its mean over blocks of steps that hold at least
    ``prompts_per_point`` prompts, with ± 1 SE bars: one prompt's reward jumps between 0 and 1, a block's mean
    reads. None when nothing was logged."""
    key = "reward" if any("reward" in r for r in log_records) else "loss"
    points = [(r["step"], r[key]) for r in log_records if key in r]
    if not points:
        return None
    plt = pyplot()
    steps, values = zip(*points)
    per_block = max(1, math.ceil(prompts_per_point / max(1, prompts_per_step)))
    blocks = reward_blocks(list(values), per_block)
    fig, ax = plt.subplots(figsize=(6, 3.8))
    ax.plot(steps, values, alpha=0.25, marker=".", linestyle="none", label=f"{key} per step")
    ax.errorbar([steps[b - 1] for b, _, _ in blocks], [m for _, m, _ in blocks], yerr=[se for _, _, se in blocks],
                marker="o", capsize=3, label=f"mean of {per_block} steps ({per_block * prompts_per_step} prompts) ± SE")
    ax.set(title=f"training {key}", xlabel="step", ylabel=key)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy(before: float, after: float, path: Path, n: int) -> Path:
    """Bar chart of held-out accuracy before and after training."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4, 3.8))
    bars = ax.bar(["before", "after"], [100 * before, 100 * after], color=["tab:gray", "tab:blue"])
    ax.bar_label(bars, fmt="%.1f%%")
    ax.set(title=f"held-out accuracy (greedy, n={n})", ylabel="accuracy (%)", ylim=(0, 100))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- the parameter-level section ------------------------------------------------------------------------------------


def _kind_table(records: Sequence[LayerRecord]) -> str:
    """Means over layers per module kind."""
    rows = []
    for kind, group in _by_kind(records).items():
        rows.append([
            kind, len(group),
            _mean([r.nss for r in group]),
            max(r.max_angle_left for r in group), max(r.max_angle_right for r in group),
            _mean([r.update_sparsity for r in group]),
            _mean([r.overlap_principal for r in group]), _mean([r.overlap_low_magnitude for r in group]),
        ])
    header = ["kind", "weights", "mean NSS", "max angle L (°)", "max angle R (°)", "mean bf16 sparsity",
              "overlap principal", "overlap low-mag"]
    return markdown_table(header, rows)


def _weight_table(records: Sequence[LayerRecord]) -> str:
    """One row per weight."""
    rows = [
        [r.name, f"{r.shape[0]}×{r.shape[1]}", r.k, r.nss, r.max_angle_left, r.max_angle_right, r.update_sparsity,
         r.overlap_principal, r.overlap_low_magnitude, max(r.leak_left, r.leak_right)]
        for r in records
    ]
    header = ["weight", "shape", "k", "NSS", "max angle L (°)", "max angle R (°)", "bf16 sparsity",
              "overlap principal", "overlap low-mag", "principal leak"]
    return markdown_table(header, rows)


def _summary_table(summary: Mapping) -> str:
    labels = {
        "layers": "weights compared", "parameters": "parameters", "update_sparsity": "bf16 update sparsity",
        "mean_nss": "mean NSS (spectral drift)", "mean_max_angle_left": "mean max principal angle, left (°)",
        "mean_max_angle_right": "mean max principal angle, right (°)",
        "mean_overlap_principal": "update ∩ principal-weight mask / update",
        "mean_overlap_low_magnitude": "update ∩ low-magnitude mask / update",
        "overlap_random_baseline": "random baseline of both overlaps (α)",
        "mean_leak_left": "mean principal leak ‖U₀ᵀΔW‖/‖ΔW‖", "mean_leak_right": "mean principal leak ‖ΔW V₀‖/‖ΔW‖",
        "mean_update_rel": "mean relative update ‖ΔW‖/‖W0‖",
    }
    return markdown_table(["metric", "value"], [[label, summary[key]] for key, label in labels.items() if key in summary])


def parameter_section(records: Sequence[LayerRecord], summary: Mapping, out_dir: Path) -> str:
    """Markdown of the parameter-level metrics with its PNGs written under ``out_dir/plots``."""
    plots = Path(out_dir) / PLOTS
    plots.mkdir(parents=True, exist_ok=True)
    k_values = sorted({r.k for r in records})
    alpha = records[0].alpha
    plot_per_layer(records, {"NSS (spectral drift)": lambda r: r.nss}, plots / "nss.png", "NSS")
    plot_per_layer(
        records,
        {"max principal angle, left (U)": lambda r: r.max_angle_left,
         "max principal angle, right (V)": lambda r: r.max_angle_right},
        plots / "principal_angles.png", "degrees",
    )
    plot_per_layer(records, {"bf16 update sparsity": lambda r: r.update_sparsity}, plots / "sparsity.png", "sparsity")
    plot_per_layer(
        records,
        {"update ∩ principal-weight mask": lambda r: r.overlap_principal,
         "update ∩ low-magnitude mask": lambda r: r.overlap_low_magnitude},
        plots / "mask_overlap.png", "fraction of updated weights", baseline=alpha,
    )
    return "\n\n".join([
        "## Parameter-level metrics (arXiv 2511.08567)",
        f"Base vs tuned weights of every linear layer (output head excluded); top-k subspaces with k = "
        f"{', '.join(map(str, k_values))} (clipped to min(m, n)); masks of density α = {alpha}. NSS = "
        "‖σ(W₁) − σ(W₀)‖/‖σ(W₀)‖; principal angles between the top-k singular subspaces of W₀ and W₁; a weight "
        "counts as updated when its bf16 value changed.",
        _summary_table(summary),
        f"![NSS per layer]({PLOTS}/nss.png)",
        f"![max principal angle per layer]({PLOTS}/principal_angles.png)",
        f"![bf16 update sparsity per layer]({PLOTS}/sparsity.png)",
        f"![mask overlaps per layer]({PLOTS}/mask_overlap.png)",
        "### Per module kind (means over layers; angles: maximum)",
        _kind_table(records),
        "### Per weight",
        "<details><summary>table</summary>\n\n" + _weight_table(records) + "\n\n</details>",
    ])


def save_parameter_metrics(records: Sequence[LayerRecord], out_dir: Path) -> None:
    """``layers.jsonl``: one LayerRecord (angle curves included) per line, written atomically."""
    write_text_atomic(Path(out_dir) / "layers.jsonl", "".join(to_json(record.as_dict()) + "\n" for record in records))


def _facts(facts: Mapping[str, object]) -> str:
    return markdown_table(["", ""], [[key, value if isinstance(value, str) else _fmt(value)] for key, value in facts.items()])


# --- whole reports ----------------------------------------------------------------------------------------------


def write_analysis_report(
    out_dir: Path, records: Sequence[LayerRecord], summary: Mapping, facts: Mapping[str, object]
) -> Path:
    """``report.md`` (+ plots, ``layers.jsonl``, ``summary.json``) for ``offprincipal analyze``."""
    out_dir = Path(out_dir)
    save_parameter_metrics(records, out_dir)
    write_json(out_dir / "summary.json", {"inputs": dict(facts), "parameter_metrics": dict(summary)})
    text = "\n\n".join(["# Parameter-level analysis", _facts(facts), parameter_section(records, summary, out_dir)])
    return write_text_atomic(out_dir / "report.md", text + "\n")


# display labels of the run facts (offprincipal.experiment.records.RunFacts); the machine's keys are shown as they are
RUN_LABELS = {
    "method": "method", "task": "task", "model": "model", "base_model": "base (to load it again)",
    "base_fingerprint": "base fingerprint", "device": "device", "precision": "precision",
    "precision_reason": "precision: why", "steps": "steps", "learning_rate": "learning rate", "rank": "rank",
    "top_k": "top-k", "metrics_k": "metrics k", "num_generations": "generations per prompt",
    "prompts_per_step": "prompts per step", "max_completion_length": "max completion length",
    "temperature": "temperature", "seed": "seed", "train_seconds": "train seconds", "wall_seconds": "wall seconds",
    "peak_memory_mb": "peak memory (MB)", "trainable_params": "trainable params",
    "load_average_start": "load average at start", "load_average_end": "load average at end",
    "reward_first_fifth": "reward, first fifth of the steps", "reward_last_fifth": "reward, last fifth of the steps",
}


def run_table(facts: Mapping[str, object]) -> str:
    """The run facts as a two-column table with display labels (``machine`` flattened)."""
    rows = {RUN_LABELS.get(key, key): value for key, value in facts.items() if key != "machine"}
    rows.update(facts.get("machine") or {})
    return _facts({key: "n/a" if value is None else value for key, value in rows.items()})


def write_train_report(
    out_dir: Path,
    facts: Mapping[str, object],
    log_records: Sequence[Mapping],
    accuracy: Mapping[str, Optional[float]],
    eval_n: int,
    records: Sequence[LayerRecord],
    summary: Mapping,
    retention: Optional[Mapping] = None,
) -> Path:
    """``report.md`` for ``offprincipal train``: run facts (the ``run`` part of ``summary.json``, which the caller
    writes), training curve, held-out accuracy before/after (with 95% intervals), retention (what the run forgot),
    and the parameter-level section (``layers.jsonl`` too; ``metrics.jsonl`` is written live)."""
    out_dir = Path(out_dir)
    plots = out_dir / PLOTS
    plots.mkdir(parents=True, exist_ok=True)
    save_parameter_metrics(records, out_dir)
    parts = ["# Training run", run_table(facts), "## Training"]
    if plot_training_curve(log_records, plots / "training_curve.png", int(facts.get("prompts_per_step") or 1)):
        parts.append(f"![training curve]({PLOTS}/training_curve.png)")
    if accuracy.get("before") is not None and accuracy.get("after") is not None:
        plot_accuracy(accuracy["before"], accuracy["after"], plots / "accuracy.png", eval_n)
        parts.append(f"{_accuracy_text(accuracy, 'Held-out accuracy', eval_n)}\n\n"
                     f"![held-out accuracy]({PLOTS}/accuracy.png)")
    elif accuracy.get("after") is not None:
        parts.append(_accuracy_text(accuracy, "Held-out accuracy after training", eval_n))
    if retention is not None:
        parts.append(_retention_text(retention))
    parts.append(parameter_section(records, summary, out_dir))
    write_text_atomic(out_dir / "report.md", "\n\n".join(parts) + "\n")
    return out_dir / "report.md"


def _interval(accuracy: Mapping, key: str, sign: str = "") -> str:
    """``key``'s value with its 95% interval: an accuracy in %, a gain (``sign="+"``) in percentage points."""
    unit = " pp" if sign else "%"
    low, high = accuracy.get(f"{key}_ci95_low"), accuracy.get(f"{key}_ci95_high")
    text = f"{100 * accuracy[key]:{sign}.1f}{unit}"
    return text if low is None else f"{text} (95% CI {100 * low:{sign}.1f} to {100 * high:{sign}.1f}{unit})"


def _accuracy_text(accuracy: Mapping, label: str, eval_n: int) -> str:
    """One plain sentence: the accuracies with their intervals, and whether the gain clears its interval."""
    if accuracy.get("before") is None:
        return f"{label} (greedy, first {eval_n} test prompts): {_interval(accuracy, 'after')}."
    text = (f"{label} (greedy, the same first {eval_n} test prompts before and after): "
            f"{100 * accuracy['before']:.1f}% → {_interval(accuracy, 'after')}; gain {_interval(accuracy, 'gain', '+')} "
            "(paired over the prompts).")
    if accuracy.get("gain_ci95_low") is None:
        return text
    if accuracy["gain_ci95_low"] > 0:
        verdict = "The gain clears its 95% interval: the run learned the task."
    elif accuracy["gain_ci95_high"] < 0:
        verdict = "The accuracy dropped beyond its 95% interval."
    else:
        verdict = ("The interval of the gain includes 0: this run does not show a change beyond noise (more steps, "
                   "more held-out prompts or several seeds would be needed to tell).")
    return f"{text} {verdict}"


def _retention_text(retention: Mapping) -> str:
    """The retention section: NLL drift of the base model's own answers, the KL to the base on those answer
    positions (when the record has it), and the second task before/after."""
    lines = [
        "## Retention (what the run forgot)",
        f"NLL of the base model's own greedy answers to {retention['prompts']} general prompts "
        f"({retention['answer_tokens']} answer tokens): {retention['base_nll_nats_per_token']:.4f} → "
        f"{retention['tuned_nll_nats_per_token']:.4f} nats/token, a drift of "
        f"**{retention['nll_drift_nats_per_token']:+.4f}** (0: the base answers are exactly as likely as before; "
        "larger: less likely; it can be negative when training makes them more likely, which is a change too).",
    ]
    kl = retention.get("kl_to_base_nats_per_token")
    if kl is not None:
        lines.append(
            f"KL divergence from the base to the tuned model's next-token distributions at those answer positions: "
            f"**{kl:.4f}** nats/token (0: unchanged there; larger: moved further; never negative). Computed over the "
            f"base's top {retention.get('kl_top_m')} tokens and the rest of the vocabulary as one bucket, a lower "
            "bound on the exact KL."
        )
    task = retention.get("task_accuracy")
    if task is not None:
        lines.append(_accuracy_text(task, f"Second task ({retention['task']}, not trained on)", task["after_n"]))
    return "\n\n".join(lines)
