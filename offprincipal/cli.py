"""The ``offprincipal`` command line.

    offprincipal train      GRPO (TRL) on a verifiable-reward task, by default on the embedded SmolLM2-135M-Instruct,
                            with the OffPrincipal adapter or one of the baselines; evaluates held-out accuracy
                            before and after and writes a run folder (weights, metrics.jsonl, report.md + PNGs)
    offprincipal analyze    the paper's parameter-level report (NSS, principal angles, bf16 sparsity, mask
                            overlaps) between a base checkpoint and a tuned one (model folder, adapter or run folder)
    offprincipal evaluate   greedy held-out accuracy of a model, adapter or run folder (what train reports before/after)
    offprincipal demo       attach an OffPrincipal adapter to the embedded model, take a few AdamW steps and print
                            loss, step time and the principal leak of every update

User errors (bad option values, missing paths, an unwritable or existing output folder, a GPU that is not there)
end with one line ``offprincipal <command>: error: ...`` and exit status 2. Output folders are built under a
temporary name next to the target and renamed into place only when complete.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import signal
import time
from contextlib import ExitStack, contextmanager, nullcontext
from pathlib import Path
from typing import Iterator, Optional

METHODS = {
    "offprincipal": "OffPrincipal adapter (PEFT): low-rank update kept off the top-k principal directions",
    "offprincipal-full": "full-parameter training with OffPrincipalAdamW (the OffPrincipalCallback)",
    "lora": "PEFT LoRA with the same rank and target modules (baseline)",
    "dora": "PEFT LoRA with use_dora=True (weight-decomposed LoRA; baseline)",
    "pissa": "PEFT LoRA with init_lora_weights='pissa' (trains the top-r principal directions; baseline)",
    "mica": "PEFT LoRA with init_lora_weights='mica' (B on minor left singular vectors; baseline)",
    "osf": "PEFT OSF: the top-k singular directions frozen, the rest trained at full rank (baseline)",
    "full": "plain full-parameter training with AdamW (baseline)",
    "sparse-principal": "full-parameter training restricted to the top-50% principal weights (|rank-k W0|)",
    "sparse-safe": "full-parameter training restricted to the 'safe' mask: low-magnitude ∪ non-principal weights",
    "sparse-random": "full-parameter training restricted to a random mask of the safe mask's density",
    "sft": "full-parameter supervised fine-tuning on the task's correct answers (TRL SFTTrainer; no RL)",
}
LORA_VARIANTS = {"lora": {}, "dora": {"use_dora": True}, "pissa": {"init_lora_weights": "pissa"},
                 "mica": {"init_lora_weights": "mica"}}
ADAPTER_METHODS = ("offprincipal", *LORA_VARIANTS, "osf")
SPARSE_METHODS = {"sparse-principal": "principal", "sparse-safe": "safe", "sparse-random": "random"}
# Adapters take ~10× the full-parameter rate ("LoRA without regret"; notes/paper.md); OSF trains full-rank blocks
# and sparse FT is full FT on fewer entries, so both take the full-parameter rate.
DEFAULT_LR = {method: 2e-4 for method in ("offprincipal", *LORA_VARIANTS)}
DEFAULT_LR.update({method: 2e-5 for method in METHODS if method not in DEFAULT_LR})
EMBEDDED = "embedded"
RETENTION_N = 100  # held-out prompts of the retention task


class CLIError(Exception):
    """A user error: printed as one line naming the argument and what to do; exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad arguments as a :class:`CLIError` (one line) instead of usage + exit."""

    def error(self, message):
        raise CLIError(f"{message} (see `{self.prog} --help`)", self.prog)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


# --------------------------------------------------------------------------------------------------------------
# shared helpers: device, model loading, top-k, atomic output folders


def _resolve_device(choice: str) -> str:
    """``cpu``/``cuda``/``auto`` → the device to use; a CUDA request without a GPU is a user error."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise CLIError("--device cuda: no CUDA GPU is visible on this machine; use --device cpu (or auto)")
    return choice


def _resolve_precision(args) -> None:
    """``args.bf16`` (True/False/None = the machine's best) → ``args.precision`` (with its reason) and a bool
    ``args.bf16``; prints the choice."""
    from .hardware import choose_precision

    args.precision = choose_precision(args.device, args.bf16)
    args.bf16 = args.precision.bf16
    print(f"precision: {args.precision.name} ({args.precision.reason})", file=sys.stderr)


def _model_source(value: Optional[str]) -> Optional[str]:
    """``None``/``"embedded"`` → None (the embedded SmolLM2-135M-Instruct), else the path or hub id."""
    return None if value in (None, EMBEDDED) else value


def _describe_model(value: Optional[str]) -> str:
    return "embedded SmolLM2-135M-Instruct" if _model_source(value) is None else str(value)


def _base_spec(value: Optional[str]) -> str:
    """How a run records its base so that ``evaluate`` can load it again: ``embedded``, an absolute path, or the
    hub id as given."""
    source = _model_source(value)
    if source is None:
        return EMBEDDED
    path = Path(source).expanduser()
    return str(path.resolve()) if path.exists() else source


def _base_fingerprint(model) -> str:
    """One BLAKE2b digest over the fingerprints of the model's linear weights (names and bytes): equal only for
    the same weights in the same dtype."""
    import hashlib

    from .metrics import linear_weights
    from .subspace import fingerprint

    digest = hashlib.blake2b(digest_size=16)
    for name, weight in linear_weights(model, skip=()).items():
        digest.update(f"{name}={fingerprint(weight)};".encode())
    return digest.hexdigest()


def _load(value: Optional[str], device: str = "cpu", option: str = "--model", dtype=None):
    """(model, tokenizer) via :func:`offprincipal.models.load_model` (fp32 unless ``dtype``); load failures become a
    CLIError naming ``option``."""
    import torch

    from .models import load_model

    source = _model_source(value)
    try:
        return load_model(source, dtype=dtype or torch.float32, device=device)
    except (OSError, ValueError) as exc:  # FileNotFoundError is an OSError
        if source is None:
            raise CLIError(f"{option}: {' '.join(str(exc).split())}") from exc
        raise CLIError(
            f"{option} {value}: cannot load a model from it ({type(exc).__name__}); pass an existing model folder, "
            f"a .gguf file, a hub id cached locally, or '{EMBEDDED}' for the embedded SmolLM2-135M-Instruct"
        ) from exc


def _check_top_k(model, top_k: int, option: str = "--top-k") -> None:
    """Every linear weight (the output head aside) must allow 1 ≤ k < min(m, n)."""
    from .metrics import linear_weights
    from .subspace import resolve_top_k

    for name, weight in linear_weights(model).items():
        try:
            resolve_top_k(top_k, tuple(weight.shape), name)
        except ValueError as exc:
            limit = min(weight.shape)
            raise CLIError(f"{option} {top_k}: too large for {name} ({weight.shape[0]}×{weight.shape[1]}); "
                           f"pass {option} < {limit}") from exc


@contextmanager
def _atomic_dir(target: Path, option: str = "--output") -> Iterator[Path]:
    """:func:`offprincipal.files.atomic_dir` with its refusals as CLIErrors naming ``option``: a folder at
    ``target`` is always complete, a failed or interrupted command leaves nothing behind (not even a ``runs/`` it
    created), and temporary folders of killed earlier runs are removed."""
    from .files import atomic_dir

    target = Path(target).expanduser()
    if target.exists():
        raise CLIError(f"{option} {target}: already exists; pass a new folder (runs are never overwritten)")
    with ExitStack() as stack:
        try:
            tmp = stack.enter_context(atomic_dir(target))
        except OSError as exc:
            raise CLIError(f"{option} {target}: cannot create it ({exc.strerror or exc}); pass a writable folder") from exc
        yield tmp


def _default_output(kind: str) -> Path:
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def _load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not on POSIX
        return None


# --------------------------------------------------------------------------------------------------------------
# train


def _autocast(args):
    """bf16 autocast for evaluation when training runs in bf16 (what the Trainer does for training steps)."""
    import torch

    return torch.autocast(args.device, dtype=torch.bfloat16) if args.bf16 else nullcontext()


def _held_out_correct(model, tokenizer, task, args, n: Optional[int] = None) -> Optional[list[bool]]:
    """Per-prompt greedy correctness on the first ``n`` (default ``--eval-n``) held-out prompts, with the training
    completion budget (None when that is 0)."""
    from .tasks import held_out_correct

    n = args.eval_n if n is None else n
    if not n:
        return None
    with _autocast(args):
        return held_out_correct(model, tokenizer, task, n=n, max_new_tokens=args.max_completion_length)


def _held_out_accuracy(model, tokenizer, task, args) -> Optional[float]:
    """Greedy accuracy on the first ``--eval-n`` held-out prompts (None if 0)."""
    correct = _held_out_correct(model, tokenizer, task, args)
    return None if correct is None else sum(correct) / len(correct)


def _accuracy_record(before: Optional[list[bool]], after: Optional[list[bool]]) -> dict:
    """before/after accuracy, the after figure's Wilson interval, and the paired gain with its interval."""
    from .stats import paired_gain, wilson_interval

    record = {"before": None if before is None else sum(before) / len(before),
              "after": None if after is None else sum(after) / len(after)}
    if after is not None:
        record.update(wilson_interval(sum(after), len(after)).as_record("after"))
    if before is not None and after is not None:
        record.update(paired_gain(before, after).as_record("gain"))
    return record


class _Retention:
    """What a run forgets (issue-level definitions in :mod:`offprincipal.retention`): the NLL drift of the base
    model's own greedy answers to general prompts, and greedy accuracy on a second task it does not train on.
    ``measure_base`` runs on the untouched model before training, ``measure_tuned`` after."""

    def __init__(self, args, tokenizer):
        from .retention import RETENTION_TASK
        from .tasks import get_task

        self.args, self.tokenizer = args, tokenizer
        self.task_name = RETENTION_TASK if args.task != RETENTION_TASK else None
        self.task = get_task(self.task_name) if self.task_name else None
        self.answers = self.base_nll = self.before = None

    def measure_base(self, model) -> None:
        from .retention import answer_nll, base_answers

        print("retention: the base model's answers to the general prompts (cached) and their NLL ...", file=sys.stderr)
        with _autocast(self.args):
            self.answers = base_answers(model, self.tokenizer)
            self.base_nll = answer_nll(model, self.tokenizer, self.answers)
        if self.task is not None and self.args.eval_before:
            self.before = _held_out_correct(model, self.tokenizer, self.task, self.args, self.args.retention_n)

    def measure_tuned(self, model) -> dict:
        from .retention import nll_drift

        with _autocast(self.args):
            drift = nll_drift(model, self.answers, self.tokenizer, base_nll=self.base_nll)
        record = {"nll_drift_nats_per_token": drift.drift_nll, "tuned_nll_nats_per_token": drift.tuned_nll,
                  "base_nll_nats_per_token": drift.base_nll, "prompts": drift.n_prompts,
                  "answer_tokens": drift.n_tokens, "task": self.task_name}
        if self.task is not None:
            after = _held_out_correct(model, self.tokenizer, self.task, self.args, self.args.retention_n)
            record["task_accuracy"] = _accuracy_record(self.before, after)
        print(f"retention: NLL drift {drift.drift_nll:+.4f} nats/token"
              + (f"; {self.task_name} accuracy {_pct(record['task_accuracy']['before'])} → "
                 f"{_pct(record['task_accuracy']['after'])}" if self.task is not None else ""), file=sys.stderr)
        return record


def _task(name: str):
    """The task ``--task`` names (a built-in one or a JSONL file); bad names and bad files become CLIErrors."""
    from .tasks import get_task

    try:
        return get_task(name)
    except KeyError as exc:
        raise CLIError(f"--task {name}: {exc.args[0]}") from exc
    except (OSError, ValueError) as exc:  # JsonlTaskError is a ValueError naming the file and every bad line
        raise CLIError(f"--task {name}: {' '.join(str(exc).split()) if isinstance(exc, OSError) else exc}") from exc


def _peft_config(args):
    """The adapter config of ``--method`` (None for the full-parameter methods): rank r, alpha = r, all linear
    layers for every adapter; OSF freezes the same top-k directions that OffPrincipal protects."""
    if args.method == "offprincipal":
        from .tuner import OffPrincipalConfig

        return OffPrincipalConfig(r=args.rank, alpha=args.rank, top_k=args.top_k, target_modules="all-linear")
    if args.method in LORA_VARIANTS:
        from peft import LoraConfig

        return LoraConfig(r=args.rank, lora_alpha=args.rank, target_modules="all-linear", task_type="CAUSAL_LM",
                          **LORA_VARIANTS[args.method])
    if args.method == "osf":
        from peft import OSFConfig

        return OSFConfig(effective_rank=args.top_k, target_modules="all-linear", task_type="CAUSAL_LM")
    return None


def _common_config(args, scratch: Path) -> dict:
    """TrainingArguments shared by GRPO and SFT: one log record per step, nothing saved by the Trainer itself."""
    return dict(
        output_dir=str(scratch), max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
        per_device_train_batch_size=args.num_generations * args.prompts_per_step, logging_steps=1,
        save_strategy="no", report_to=[], seed=args.seed, use_cpu=args.device == "cpu", bf16=args.bf16,
        activation_checkpointing=False,
    )


def _sft_dataset(task):
    """The task's train prompts with their correct answers as the assistant completion."""
    from datasets import Dataset

    return Dataset.from_list([
        {"prompt": row["prompt"], "completion": [{"role": "assistant", "content": row["answer"]}]}
        for row in task.rows("train")
    ])


def _make_trainer(args, model, tokenizer, task, scratch: Path, callbacks: list):
    """GRPOTrainer for the RL methods, SFTTrainer for ``sft``; the Trainer's own progress bar is replaced by ours."""
    from transformers.trainer_callback import ProgressCallback

    if args.method == "sft":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model, args=SFTConfig(**_common_config(args, scratch)),
                             train_dataset=_sft_dataset(task), processing_class=tokenizer, callbacks=callbacks)
    else:
        from trl import GRPOConfig, GRPOTrainer

        config = GRPOConfig(**_common_config(args, scratch), num_generations=args.num_generations,
                            max_completion_length=args.max_completion_length, temperature=args.temperature,
                            reward_weights=task.reward_weights)
        trainer = GRPOTrainer(model=model, reward_funcs=task.reward_funcs, args=config,
                              train_dataset=task.dataset("train"), processing_class=tokenizer,
                              peft_config=_peft_config(args), callbacks=callbacks)
    trainer.remove_callback(ProgressCallback)
    return trainer


def _progress_fields(record: dict) -> str:
    """The console line of one logged step."""
    fields = [
        ("reward", "reward", "{:.3f}"), ("loss", "loss", "{:.4f}"), ("eval/accuracy", "held-out acc", "{:.1%}"),
        ("completions/mean_length", "length", "{:.1f}"), ("step_time", "step time", "{:.1f} s"),
        ("offprincipal/leak_max", "leak", "{:.1e}"), ("offprincipal/principal_shift_max", "principal shift", "{:.1e}"),
    ]
    if "reward" in record:
        fields.pop(1)  # GRPO's loss is not informative next to the reward
    return "  ".join(f"{label} {fmt.format(record[key])}" for key, label, fmt in fields if key in record)


def _callbacks(args, metrics_path: Path, evaluate):
    """Diagnostics of the method, optional periodic held-out accuracy, and the progress/metrics.jsonl writer (last,
    so it sees what the others add to each log)."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    from .report import to_json
    from .trainer import OffPrincipalCallback, OffPrincipalDiagnosticsCallback, PeriodicLogsCallback

    class HeldOutAccuracy(PeriodicLogsCallback):
        """Greedy held-out accuracy every ``--eval-every`` steps, logged as ``eval/accuracy``."""

        def diagnostics(self, model):
            return {"eval/accuracy": evaluate(model)}

    class Progress(TrainerCallback):
        """A tqdm bar over steps, one console line per logged step, and ``metrics.jsonl`` written as it goes."""

        def __init__(self):
            self.records: list[dict] = []
            self.bar = None
            self.step_start = self.step_seconds = 0.0

        def on_train_begin(self, args_, state, control, **kwargs):
            self.bar = tqdm(total=state.max_steps, desc=f"train ({args.method})", unit="step")

        def on_step_begin(self, args_, state, control, **kwargs):
            self.step_start = time.perf_counter()

        def on_step_end(self, args_, state, control, **kwargs):
            self.step_seconds = time.perf_counter() - self.step_start

        def on_log(self, args_, state, control, logs=None, **kwargs):
            if "train_runtime" in logs:  # the Trainer's end-of-training summary, not a step
                return
            # GRPO logs its own step_time (generation included); SFT does not
            record = {"step": state.global_step, "step_time": self.step_seconds, **logs}
            self.records.append(record)
            with open(metrics_path, "a") as handle:
                handle.write(to_json(record) + "\n")
            self.bar.update(state.global_step - self.bar.n)
            self.bar.write(f"step {state.global_step}/{state.max_steps}  {_progress_fields(record)}")

        def on_train_end(self, args_, state, control, **kwargs):
            self.bar.close()

    callbacks = []
    if args.method == "offprincipal":
        callbacks.append(OffPrincipalDiagnosticsCallback(log_every=1))
    elif args.method == "offprincipal-full":
        callbacks.append(OffPrincipalCallback(top_k=args.top_k, log_every=1))
    elif args.method in SPARSE_METHODS:
        from .sparse import SparseMaskCallback

        callbacks.append(SparseMaskCallback(SPARSE_METHODS[args.method], top_k=args.top_k))
    if args.eval_every and args.eval_n:
        callbacks.append(HeldOutAccuracy(args.eval_every))
    return callbacks + [Progress()]


def _peak_memory_mb(device: str) -> float:
    """Peak memory so far: CUDA allocations on a GPU, else the process's peak resident set (model, data and optimizer
    state, plus the fp32 copy of the base weights kept for the parameter metrics, the same for every method)."""
    import torch

    if device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def _trainable(model, callbacks) -> int:
    """Parameters the optimizer can change (for sparse masks, the masks' entries plus the unmasked parameters)."""
    from .sparse import SparseMaskCallback

    for callback in callbacks:
        if isinstance(callback, SparseMaskCallback):
            return callback.trainable_entries(model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _summarize_rewards(records: list[dict], key: str = "reward") -> dict:
    """Mean of the first and last fifth of the logged steps (a noisy per-step reward made readable)."""
    values = [r[key] for r in records if key in r]
    if not values:
        return {}
    fifth = max(1, len(values) // 5)
    return {f"{key}_first_fifth": sum(values[:fifth]) / fifth, f"{key}_last_fifth": sum(values[-fifth:]) / fifth}


def _run_facts(args, progress_records: list[dict], train_seconds: float, start: float, load_start) -> dict:
    """The run's settings, timings, machine and reward summary, for report.md and summary.json."""
    from .hardware import describe_machine

    return {
        "method": f"{args.method} — {METHODS[args.method]}", "task": args.task, "model": _describe_model(args.model),
        "device": args.device, "bf16": str(args.bf16),
        "precision": args.precision.name, "precision reason": args.precision.reason, "steps": args.steps, "learning rate": args.lr,
        "rank": args.rank if args.method in ("offprincipal", *LORA_VARIANTS) else "n/a", "top-k": args.top_k,
        "metrics k": args.metrics_k,
        "num generations": args.num_generations, "prompts per step": args.prompts_per_step,
        "max completion length": args.max_completion_length, "temperature": args.temperature, "seed": args.seed,
        "train seconds": round(train_seconds, 1), "wall seconds": round(time.perf_counter() - start, 1),
        "load average at start / end": f"{load_start} / {_load_average()}",
        **args.base_record, **{key: str(value) for key, value in describe_machine().items()},
        **_summarize_rewards(progress_records),
    }


def _train_into(args, folder: Path, start: float) -> Path:
    """The whole training job, written into ``folder``; returns the report's path."""
    from transformers import set_seed

    from .metrics import compare_weights, linear_weights
    from .report import write_train_report

    load_start = _load_average()
    set_seed(args.seed)
    model, tokenizer = _load(args.model, args.device)
    _check_top_k(model, args.top_k)
    _check_top_k(model, args.metrics_k, "--metrics-k")
    args.base_record = {"base_model": _base_spec(args.model), "base_fingerprint": _base_fingerprint(model)}
    task = _task(args.task)
    base = {name: w.detach().to("cpu", copy=True) for name, w in linear_weights(model).items()}

    def evaluate(m):
        return _held_out_accuracy(m, tokenizer, task, args)

    before = None
    if args.eval_before:
        print(f"held-out accuracy before training (greedy, n={args.eval_n}) ...", file=sys.stderr)
        before = _held_out_correct(model, tokenizer, task, args)
        print(f"held-out accuracy before: {_pct(_accuracy_record(before, None)['before'])}", file=sys.stderr)
    retention = _Retention(args, tokenizer) if args.retention else None
    if retention is not None:
        retention.measure_base(model)
    callbacks = _callbacks(args, folder / "metrics.jsonl", evaluate)
    trainer = _make_trainer(args, model, tokenizer, task, folder / "trainer", callbacks)
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start
    memory = {"peak memory MB": _peak_memory_mb(args.device), "trainable params": _trainable(trainer.model, callbacks)}
    shutil.rmtree(folder / "trainer", ignore_errors=True)  # the Trainer's scratch output_dir (save_strategy="no")
    is_adapter = args.method in ADAPTER_METHODS
    if args.method == "pissa":  # its adapter is relative to rewritten (residual) base weights: save the merged model
        tuned = trainer.model.merge_and_unload()
        tuned.save_pretrained(str(folder / "model"))
        tokenizer.save_pretrained(str(folder / "model"))
    else:
        trainer.save_model(str(folder / ("adapter" if is_adapter else "model")))
        tuned = trainer.model.merge_and_unload() if is_adapter else trainer.model
    accuracy = _accuracy_record(before, _held_out_correct(tuned, tokenizer, task, args))
    print(f"held-out accuracy after: {_pct(accuracy['after'])}", file=sys.stderr)
    retained = retention.measure_tuned(tuned) if retention is not None else None
    records, summary = compare_weights(base, {n: w.cpu() for n, w in linear_weights(tuned).items()}, k=args.metrics_k)
    progress = callbacks[-1].records
    facts = {**_run_facts(args, progress, train_seconds, start, load_start), **memory}
    return write_train_report(folder, facts, progress, accuracy, args.eval_n, records, summary, retained)


def cmd_train(args) -> None:
    start = time.perf_counter()
    args.device = _resolve_device(args.device)
    _resolve_precision(args)
    args.lr = args.lr if args.lr is not None else DEFAULT_LR[args.method]
    args.metrics_k = args.metrics_k or args.top_k
    _task(args.task)  # a bad --task fails before any output folder exists
    target = Path(args.output) if args.output else _default_output(f"{args.method}-{Path(args.task).stem}")
    with _atomic_dir(target) as tmp:
        report = _train_into(args, tmp, start)
    print(f"run folder: {target} (report: {target / report.name}; wall time {time.perf_counter() - start:.0f} s)")


def _pct(value: Optional[float]) -> str:
    return "skipped (--eval-n 0)" if value is None else f"{100 * value:.1f}%"


# --------------------------------------------------------------------------------------------------------------
# analyze


def _tuned_checkpoint(value: str) -> Path:
    """TUNED as given: a model folder, an adapter folder, or a ``train`` run folder (its adapter/ or model/)."""
    path = Path(value).expanduser()
    if not path.exists():
        raise CLIError(f"TUNED {value}: not found; pass a model folder, an adapter folder or a run folder of `train`")
    for sub in ("adapter", "model"):
        if (path / sub).is_dir() and not (path / "config.json").exists():
            return path / sub
    return path


def _recorded_base(tuned: Path) -> tuple[Optional[str], Optional[str]]:
    """(base, base fingerprint) recorded by ``train`` in the run folder holding ``tuned`` (``run/adapter``), else
    (None, None). Runs recorded before the base was stored name it only in their ``model`` field."""
    summary = tuned.parent / "summary.json"
    if tuned.name not in ("adapter", "model") or not summary.is_file():
        return None, None
    import json

    try:
        run = json.loads(summary.read_text())["run"]
    except (OSError, ValueError, KeyError) as exc:
        raise CLIError(f"{summary}: unreadable run summary ({exc}); pass the adapter folder and --base") from exc
    if "base_model" in run:
        return run["base_model"], run.get("base_fingerprint")
    described = run.get("model")
    return (EMBEDDED if described == _describe_model(None) else described), None


def _load_tuned(base: Optional[str], tuned: Path, option: str = "BASE"):
    """(tuned model, tokenizer); an adapter folder (adapter_config.json) is loaded onto its base and merged.

    The base is ``base`` when given, else the one the run folder records; a given base is checked against the
    recorded fingerprint, so an adapter is never evaluated on weights it was not trained on."""
    if not (tuned / "adapter_config.json").exists():
        return _load(str(tuned), option="TUNED")
    from peft import PeftModel

    import offprincipal  # noqa: F401 - registers the OffPrincipal PEFT method for adapters saved by it

    recorded, recorded_fp = _recorded_base(tuned)
    model, tokenizer = _load(base if base is not None else recorded, option=option)
    if recorded_fp is not None and _base_fingerprint(model) != recorded_fp:
        given = f"{option} {base}" if base is not None else f"the recorded base {recorded}"
        raise CLIError(f"{given}: its weights differ from the base the run {tuned.parent} was trained on "
                       f"({recorded}); pass that base (an adapter only makes sense on its own base)")
    return PeftModel.from_pretrained(model, str(tuned)).merge_and_unload(), tokenizer


def cmd_analyze(args) -> None:
    from .metrics import compare_weights, linear_weights
    from .report import write_analysis_report

    tuned_path = _tuned_checkpoint(args.tuned)
    target = Path(args.output) if args.output else _default_output("analyze")
    with _atomic_dir(target) as tmp:
        base_model = _load(args.base, option="BASE")[0]
        _check_top_k(base_model, args.top_k)
        tuned_model = _load_tuned(args.base, tuned_path)[0]
        try:
            records, summary = compare_weights(linear_weights(base_model), linear_weights(tuned_model), k=args.top_k,
                                               alpha=args.alpha)
        except (KeyError, ValueError) as exc:
            raise CLIError(f"TUNED {args.tuned}: does not match BASE ({' '.join(str(exc).split())}); "
                           "pass a checkpoint tuned from BASE") from exc
        facts = {"base": _describe_model(args.base), "tuned": str(tuned_path), "top-k": args.top_k, "alpha": args.alpha}
        report = write_analysis_report(tmp, records, summary, facts)
    print(f"NSS {summary['mean_nss']:.3g}  max angle L/R {summary['mean_max_angle_left']:.3g}°/"
          f"{summary['mean_max_angle_right']:.3g}°  bf16 sparsity {summary['update_sparsity']:.3f}")
    print(f"report: {target / report.name}")


# --------------------------------------------------------------------------------------------------------------
# evaluate


def cmd_evaluate(args) -> None:
    from .report import to_json

    args.device = _resolve_device(args.device)
    _resolve_precision(args)
    model, tokenizer = (_load(args.model, args.device) if args.model in (None, EMBEDDED)
                        else _load_tuned(args.base, _tuned_checkpoint(args.model), option="--base"))
    model.to(args.device)
    start = time.perf_counter()
    correct = _held_out_correct(model, tokenizer, _task(args.task), args)
    accuracy = _accuracy_record(None, correct)
    seconds = time.perf_counter() - start
    print(f"held-out accuracy (greedy, first {args.eval_n} {args.task} test prompts): "
          f"{_interval_text(accuracy)} in {seconds:.0f} s")
    if args.json:
        print(to_json({"accuracy": accuracy["after"], "accuracy_ci95_low": accuracy["after_ci95_low"],
                       "accuracy_ci95_high": accuracy["after_ci95_high"], "eval_n": len(correct), "task": args.task,
                       "model": _describe_model(args.model), "max_completion_length": args.max_completion_length,
                       "bf16": args.bf16, "precision": args.precision.name, "precision_reason": args.precision.reason,
                       "seconds": seconds}))


def _interval_text(accuracy: dict, key: str = "after") -> str:
    return (f"{100 * accuracy[key]:.1f}% (95% CI {100 * accuracy[f'{key}_ci95_low']:.1f}–"
            f"{100 * accuracy[f'{key}_ci95_high']:.1f}%)")


# --------------------------------------------------------------------------------------------------------------
# demo


def _demo_batch(tokenizer, n: int):
    """n chat examples "What is a + b?" → "a + b = c." (supervised; the GRPO job is `offprincipal train`)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    texts = []
    for _ in range(n):
        a, b = (int(x) for x in torch.randint(10, 99, (2,), generator=gen))
        messages = [
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}."},
        ]
        texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return {**batch, "labels": labels}


def cmd_demo(args) -> None:
    import torch
    from peft import get_peft_model

    from .tuner import OffPrincipalConfig, max_principal_leak

    torch.manual_seed(args.seed)
    model, tokenizer = _load(args.model, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype])
    _check_top_k(model, args.top_k)
    t = time.perf_counter()
    config = OffPrincipalConfig(r=args.rank, alpha=args.rank, top_k=args.top_k, target_modules="all-linear")
    model = get_peft_model(model, config)
    print(f"adapter attached in {time.perf_counter() - t:.1f} s (principal bases of every linear weight, cached)")
    model.print_trainable_parameters()
    batch = _demo_batch(tokenizer, args.batch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01)
    model.train()
    for step in range(1, args.steps + 1):
        t = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t
        leak = max_principal_leak(model)
        print(f"step {step}/{args.steps}  loss {loss.item():.4f}  step time {elapsed:.2f} s  principal leak {leak:.1e}")


# --------------------------------------------------------------------------------------------------------------
# parser


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="GRPO on a verifiable-reward task (default: OffPrincipal adapter on the embedded model)",
        description="GRPO (TRL) with an OffPrincipal adapter or a baseline; held-out accuracy before/after; a run "
                    "folder with the weights, metrics.jsonl and report.md (+ PNG plots).",
    )
    p.add_argument("--method", choices=list(METHODS), default="offprincipal",
                   help="; ".join(f"{k}: {v}" for k, v in METHODS.items()).replace("%", "%%") + " (default: offprincipal)")
    from .tasks import TASKS

    p.add_argument("--task", default="arithmetic", metavar="TASK",
                   help=f"verifiable-reward task: {', '.join(sorted(TASKS))}, or a JSONL file of your own with one "
                        '{"prompt": ..., "answer": ...} per line (see the README) (default: arithmetic)')
    p.add_argument("--model", default=None,
                   help=f"model folder, .gguf file or hub id (default: '{EMBEDDED}', SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=_positive_int, default=32, help="optimizer steps (default: 32)")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate (default: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    p.add_argument("--rank", type=_positive_int, default=16, help="adapter rank r, alpha = r (default: 16)")
    p.add_argument("--top-k", type=_positive_int, default=32,
                   help="protected principal subspace per weight, also the k of the report's angles (default: 32)")
    p.add_argument("--metrics-k", type=_positive_int, default=None,
                   help="k of the report's principal angles, drift and masks (default: --top-k; a benchmark fixes it "
                        "so that runs with different --top-k compare)")
    p.add_argument("--num-generations", type=_positive_int, default=8, help="completions per prompt (default: 8)")
    p.add_argument("--prompts-per-step", type=_positive_int, default=1,
                   help="prompts per optimizer step (default: 1); sft trains on num-generations × prompts-per-step "
                        "examples per step, the same number of sequences as GRPO")
    p.add_argument("--max-completion-length", type=_positive_int, default=48,
                   help="completion budget in tokens, for training and evaluation (default: 48)")
    p.add_argument("--temperature", type=_positive_float, default=0.7,
                   help="sampling temperature of the GRPO completions (default: 0.7; at 1.0 the embedded model's "
                        "samples are rarely right, so rewards rarely vary within a group)")
    p.add_argument("--eval-n", type=_non_negative_int, default=32,
                   help="held-out prompts for the greedy accuracy before/after (0: skip; default: 32)")
    p.add_argument("--eval-before", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate held-out accuracy before training (default: on; a benchmark measures the base "
                        "model once and passes --no-eval-before)")
    p.add_argument("--retention", action=argparse.BooleanOptionalAction, default=True,
                   help="measure forgetting: the NLL drift of the base model's own answers to 64 general prompts, and "
                        "greedy accuracy on the capitals task before/after (default: on)")
    p.add_argument("--retention-n", type=_positive_int, default=RETENTION_N,
                   help=f"held-out prompts of the second (retention) task (default: {RETENTION_N})")
    p.add_argument("--eval-every", type=_non_negative_int, default=0,
                   help="also evaluate held-out accuracy every N steps (default: 0, only before and after)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast for training and evaluation; weights stay fp32 (default: where the hardware "
                        "multiplies bf16 natively: a CUDA GPU with bf16, or a CPU with AVX512_BF16/AMX that a quick "
                        "matmul benchmark confirms; else fp32)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto", help="(default: auto)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="run folder to create (default: runs/<method>-<task>-<time>)")
    p.set_defaults(func=cmd_train)


def _add_analyze(sub) -> None:
    p = sub.add_parser(
        "analyze", help="the paper's parameter-level report between two checkpoints",
        description="NSS, principal angles, bf16 update sparsity and mask overlaps of every linear weight, "
                    "BASE vs TUNED, as report.md + PNG plots + layers.jsonl + summary.json.",
    )
    p.add_argument("base", metavar="BASE", help=f"base model folder, .gguf file or hub id ('{EMBEDDED}': SmolLM2-135M)")
    p.add_argument("tuned", metavar="TUNED",
                   help="tuned model folder, adapter folder (merged onto BASE) or run folder of `offprincipal train`")
    p.add_argument("--top-k", type=_positive_int, default=64, help="k of the principal subspaces (default: 64)")
    p.add_argument("--alpha", type=_fraction, default=0.5,
                   help="density of the principal-weight and low-magnitude masks, in (0, 1) (default: 0.5)")
    p.add_argument("--output", default=None, help="report folder to create (default: runs/analyze-<time>)")
    p.set_defaults(func=cmd_analyze)


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="greedy held-out accuracy of a model, adapter or run folder on a task",
        description="Greedy held-out accuracy on the first --eval-n test prompts of a task (what `train` reports "
                    "before and after training).",
    )
    from .tasks import TASKS

    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help=f"model folder, adapter folder (merged onto --base), run folder of `train`, or '{EMBEDDED}' "
                        "(default)")
    p.add_argument("--base", default=None,
                   help=f"base model of an adapter (default: the base a run folder records, else '{EMBEDDED}'); "
                        "checked against the base the run was trained on")
    p.add_argument("--task", default="arithmetic", metavar="TASK",
                   help=f"verifiable-reward task: {', '.join(sorted(TASKS))}, or a JSONL file of your own with one "
                        '{"prompt": ..., "answer": ...} per line (see the README) (default: arithmetic)')
    p.add_argument("--eval-n", type=_positive_int, default=200, help="held-out prompts (default: 200)")
    p.add_argument("--max-completion-length", type=_positive_int, default=48, help="token budget (default: 48)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: where the hardware has native bf16, as for train)")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto", help="(default: auto)")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    p.set_defaults(func=cmd_evaluate)


def _add_demo(sub) -> None:
    demo = sub.add_parser("demo", help="attach the adapter to the embedded model and take a few steps")
    demo.add_argument("--model", default=None, help="model directory or hub id (default: embedded SmolLM2-135M)")
    demo.add_argument("--steps", type=_positive_int, default=5)
    demo.add_argument("--batch", type=_positive_int, default=8)
    demo.add_argument("--rank", type=_positive_int, default=16)
    demo.add_argument("--top-k", type=_positive_int, default=32)
    demo.add_argument("--lr", type=_positive_float, default=1e-3)
    demo.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="offprincipal", description="Off-principal RLVR fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_analyze(sub)
    _add_evaluate(sub)
    _add_demo(sub)
    return parser


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that ``finally`` blocks (temporary run folders) clean up."""


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (only from the main thread, where handlers live)."""
    def handler(signum, frame):
        raise Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv=None) -> int:
    """Entry point; returns the exit status (0 success, 2 user error, 130 Ctrl-C, 143 SIGTERM). An interruption
    prints one line; the command's temporary output folder is removed before it returns."""
    args = None
    prog = "offprincipal"
    try:
        with _sigterm_raises():
            args = build_parser().parse_args(argv)
            prog = f"offprincipal {args.command}"
            args.func(args)
    except CLIError as exc:
        prog = exc.args[1] if len(exc.args) > 1 else prog
        print(f"{prog}: error: {exc.args[0]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted (Ctrl-C); nothing was written", file=sys.stderr)
        return 130
    except Terminated:
        print(f"{prog}: terminated (SIGTERM); nothing was written", file=sys.stderr)
        return 143
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
