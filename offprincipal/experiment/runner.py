"""The experiments behind the command line: ``train`` (GRPO or SFT through TRL, with held-out accuracy and
retention before and after, into a run folder), ``evaluate``, ``analyze`` and ``demo``.

The entry points (``train``, ``evaluate``, ``analyze``, ``demo``) take the parsed options of their command (an
``argparse.Namespace``; the command line in :mod:`offprincipal.cli` documents every option); ``train`` and
``evaluate`` turn them once into a frozen :class:`~offprincipal.experiment.spec.TrainSpec` /
:class:`~offprincipal.experiment.spec.EvalSpec`, which is all that the functions below them receive. Bad input
raises :class:`~offprincipal.experiment.errors.UsageError`. ``train`` writes ``summary.json`` as
:mod:`~offprincipal.experiment.records` defines it.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Optional

from .callbacks import build_callbacks
from .checkpoints import (
    EMBEDDED, base_fingerprint, base_spec, check_top_k, describe_model, load, load_tuned, tuned_checkpoint,
)
from .errors import UsageError
from .evaluation import (
    Retention, accuracy_record, held_out_accuracy, held_out_outcomes, interval_text, outcome_record, pct, resolve_task,
)
from .methods import get_method
from .records import COMPLETIONS_FILE, RunFacts, write_completions, write_summary
from .spec import EvalSpec, TrainSpec


def resolve_device(choice: str) -> str:
    """``cpu``/``cuda``/``auto`` → the device to use; a CUDA request without a GPU is a user error."""
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is visible on this machine; use --device cpu (or auto)")
    return choice


def resolve_precision(device: str, bf16: Optional[bool]):
    """``--bf16`` (True/False/None = the machine's best) on ``device`` → a :class:`~offprincipal.experiment.hardware.Precision`
    (with its reason); prints the choice."""
    from .hardware import choose_precision

    precision = choose_precision(device, bf16)
    print(f"precision: {precision.name} ({precision.reason})", file=sys.stderr)
    return precision


@contextmanager
def output_folder(target: Path, option: str = "--output") -> Iterator[Path]:
    """:func:`offprincipal.files.atomic_dir` with its refusals as UsageErrors naming ``option``: a folder at
    ``target`` is always complete, a failed or interrupted command leaves nothing behind (not even a ``runs/`` it
    created), temporary folders of killed earlier runs in the same parent are removed, and a second command
    writing the same ``target`` is refused before it starts."""
    from ..files import FolderBusyError, atomic_dir

    target = Path(target).expanduser()
    if target.exists():
        raise UsageError(f"{option} {target}: already exists; pass a new folder (runs are never overwritten)")
    with ExitStack() as stack:
        try:
            tmp = stack.enter_context(atomic_dir(target))
        except FolderBusyError as exc:
            raise UsageError(f"{option} {target}: {exc.detail}") from exc
        except OSError as exc:
            raise UsageError(f"{option} {target}: cannot create it ({exc.strerror or exc}); pass a writable folder") from exc
        yield tmp
        try:
            stack.close()  # renames the folder into place
        except FileExistsError as exc:  # the target appeared meanwhile; the output is kept (the message says where)
            raise UsageError(f"{option} {exc}") from exc


def default_output(kind: str) -> Path:
    return Path("runs") / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"


def load_average() -> Optional[float]:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not on POSIX
        return None


def common_config(spec: TrainSpec, scratch: Path) -> dict:
    """TrainingArguments shared by GRPO and SFT: one log record per step, nothing saved by the Trainer itself."""
    return dict(
        output_dir=str(scratch), max_steps=spec.steps, learning_rate=spec.lr, lr_scheduler_type="constant",
        per_device_train_batch_size=spec.num_generations * spec.prompts_per_step, logging_steps=1,
        save_strategy="no", report_to=[], seed=spec.seed, use_cpu=spec.device == "cpu", bf16=spec.bf16,
        activation_checkpointing=False,
    )


def sft_dataset(task):
    """The task's train prompts with their correct answers as the assistant completion."""
    from datasets import Dataset

    return Dataset.from_list([
        {"prompt": row["prompt"], "completion": [{"role": "assistant", "content": row["answer"]}]}
        for row in task.rows("train")
    ])


def _peft_config(spec: TrainSpec):
    """The adapter config of the run's method (None for the full-parameter methods)."""
    method = get_method(spec.method)
    return method.peft_config(spec.rank, spec.top_k, spec.seed) if method.peft_config is not None else None


def make_trainer(spec: TrainSpec, model, tokenizer, task, scratch: Path, callbacks: list):
    """GRPOTrainer for the RL methods, SFTTrainer for ``sft``; the Trainer's own progress bar is replaced by ours."""
    from transformers.trainer_callback import ProgressCallback

    if get_method(spec.method).trainer == "sft":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model, args=SFTConfig(**common_config(spec, scratch)),
                             train_dataset=sft_dataset(task), processing_class=tokenizer, callbacks=callbacks)
    else:
        from trl import GRPOConfig, GRPOTrainer

        config = GRPOConfig(**common_config(spec, scratch), num_generations=spec.num_generations,
                            max_completion_length=spec.max_completion_length, temperature=spec.temperature,
                            reward_weights=task.reward_weights)
        trainer = GRPOTrainer(model=model, reward_funcs=task.reward_funcs, args=config,
                              train_dataset=task.dataset("train"), processing_class=tokenizer,
                              peft_config=_peft_config(spec), callbacks=callbacks)
    trainer.remove_callback(ProgressCallback)
    return trainer


def peak_memory_mb(device: str) -> float:
    """Peak memory so far: CUDA allocations on a GPU, else the process's peak resident set (model, data and optimizer
    state, plus the fp32 copy of the base weights kept for the parameter metrics, the same for every method)."""
    import torch

    if device == "cuda":
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def trainable_count(model, callbacks) -> int:
    """Parameters the optimizer can change (for sparse masks, the masks' entries plus the unmasked parameters)."""
    from .sparse import SparseMaskCallback

    for callback in callbacks:
        if isinstance(callback, SparseMaskCallback):
            return callback.trainable_entries(model)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def summarize_rewards(records: list[dict], key: str = "reward") -> dict:
    """Mean of the first and last fifth of the logged steps (a noisy per-step reward made readable)."""
    values = [r[key] for r in records if key in r]
    if not values:
        return {}
    fifth = max(1, len(values) // 5)
    return {f"{key}_first_fifth": sum(values[:fifth]) / fifth, f"{key}_last_fifth": sum(values[-fifth:]) / fifth}


def run_facts(spec: TrainSpec, base_record: dict, progress_records: list[dict], train_seconds: float, start: float,
              load_start, memory: dict) -> RunFacts:
    """The typed ``run`` part of ``summary.json``: the spec's settings, the base model (``base_record``: its
    spec and fingerprint), timings, machine and reward summary."""
    from .hardware import describe_machine

    method = get_method(spec.method)
    rewards = summarize_rewards(progress_records)
    return RunFacts(
        method=method.name, task=spec.task, model=spec.model or EMBEDDED, **base_record, device=spec.device,
        precision=spec.precision.name, precision_reason=spec.precision.reason, steps=spec.steps,
        learning_rate=spec.lr, rank=spec.rank if method.has_rank else None, top_k=spec.top_k,
        metrics_k=spec.metrics_k, num_generations=spec.num_generations, prompts_per_step=spec.prompts_per_step,
        max_completion_length=spec.max_completion_length, temperature=spec.temperature, seed=spec.seed,
        train_seconds=round(train_seconds, 1), wall_seconds=round(time.perf_counter() - start, 1), **memory,
        load_average_start=load_start, load_average_end=load_average(),
        reward_first_fifth=rewards.get("reward_first_fifth"), reward_last_fifth=rewards.get("reward_last_fifth"),
        machine=describe_machine(),
    )


def train_into(spec: TrainSpec, folder: Path, start: float) -> Path:
    """The whole training job, written into ``folder`` (weights, ``metrics.jsonl``, ``summary.json`` as
    :mod:`~offprincipal.experiment.records` defines it, ``report.md`` with plots); returns the report's path."""
    from transformers import set_seed

    from ..metrics import compare_weights, linear_weights
    from .report import write_train_report

    load_start = load_average()
    set_seed(spec.seed)
    model, tokenizer = load(spec.model, spec.device)
    check_top_k(model, spec.top_k)
    check_top_k(model, spec.metrics_k, "--metrics-k")
    base_record = {"base_model": base_spec(spec.model), "base_fingerprint": base_fingerprint(model)}
    task = resolve_task(spec.task)
    base = {name: w.detach().to("cpu", copy=True) for name, w in linear_weights(model).items()}

    def evaluate(m):
        return held_out_accuracy(m, tokenizer, task, spec)

    before = None
    if spec.eval_before:
        print(f"held-out accuracy before training (greedy, n={spec.eval_n}) ...", file=sys.stderr)
        before = held_out_outcomes(model, tokenizer, task, spec)
        print(f"held-out accuracy before: {pct(outcome_record(before, None)['before'])}", file=sys.stderr)
    retention = Retention(spec, tokenizer) if spec.retention else None
    if retention is not None:
        retention.measure_base(model)
    callbacks = build_callbacks(spec, folder / "metrics.jsonl", evaluate)
    trainer = make_trainer(spec, model, tokenizer, task, folder / "trainer", callbacks)
    train_start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_start
    memory = {"peak_memory_mb": peak_memory_mb(spec.device), "trainable_params": trainable_count(trainer.model, callbacks)}
    shutil.rmtree(folder / "trainer", ignore_errors=True)  # the Trainer's scratch output_dir (save_strategy="no")
    method = get_method(spec.method)
    is_adapter = method.adapter
    if method.merges_base:  # its adapter is relative to rewritten (residual) base weights: save the merged model
        tuned = trainer.model.merge_and_unload()
        tuned.save_pretrained(str(folder / "model"))
        tokenizer.save_pretrained(str(folder / "model"))
    else:
        trainer.save_model(str(folder / ("adapter" if is_adapter else "model")))
        tuned = trainer.model.merge_and_unload() if is_adapter else trainer.model
    final = held_out_outcomes(tuned, tokenizer, task, spec)
    accuracy = outcome_record(before, final)
    if final is not None:  # the completions of the final evaluation, beside summary.json
        write_completions(folder / COMPLETIONS_FILE, final)
        accuracy["completions_file"] = COMPLETIONS_FILE
    print(f"held-out accuracy after: {pct(accuracy['after'])}"
          + ("" if final is None else f" (strict {pct(accuracy['strict_after'])})"), file=sys.stderr)
    retained = retention.measure_tuned(tuned) if retention is not None else None
    records, summary = compare_weights(base, {n: w.cpu() for n, w in linear_weights(tuned).items()}, k=spec.metrics_k)
    progress = callbacks[-1].records
    facts = run_facts(spec, base_record, progress, train_seconds, start, load_start, memory)
    write_summary(folder, facts, accuracy, retained, summary)
    return write_train_report(folder, asdict(facts), progress, accuracy, spec.eval_n, records, summary, retained)


def train(args) -> Path:
    """``offprincipal train``: the run folder ``--output`` (default ``runs/<method>-<task>-<time>``), built under a
    temporary name and renamed when complete; returns it."""
    start = time.perf_counter()
    # the spec, every default resolved (device, precision, the method's canonical name and default rate, metrics_k);
    # a bad --task fails here, before any output folder exists
    device = resolve_device(args.device)
    method = get_method(args.method)
    resolve_task(args.task)
    spec = TrainSpec(
        device=device, precision=resolve_precision(device, args.bf16), eval_n=args.eval_n,
        max_completion_length=args.max_completion_length, method=method.name, task=args.task, model=args.model,
        steps=args.steps, lr=args.lr if args.lr is not None else method.default_lr, rank=args.rank, top_k=args.top_k,
        metrics_k=args.metrics_k or args.top_k, num_generations=args.num_generations,
        prompts_per_step=args.prompts_per_step, temperature=args.temperature, eval_before=args.eval_before,
        eval_every=args.eval_every, retention=args.retention, retention_n=args.retention_n, seed=args.seed,
        output=args.output,
    )
    target = Path(spec.output) if spec.output else default_output(f"{spec.method}-{Path(spec.task).stem}")
    with output_folder(target) as tmp:
        report = train_into(spec, tmp, start)
    print(f"run folder: {target} (report: {target / report.name}; wall time {time.perf_counter() - start:.0f} s)")
    return target


def evaluate(args) -> None:
    from ..files import to_json

    device = resolve_device(args.device)
    spec = EvalSpec(device=device, precision=resolve_precision(device, args.bf16), eval_n=args.eval_n,
                    max_completion_length=args.max_completion_length)
    model, tokenizer = (load(args.model, device) if args.model in (None, EMBEDDED)
                        else load_tuned(args.base, tuned_checkpoint(args.model), option="--base"))
    model.to(device)
    start = time.perf_counter()
    outcomes = held_out_outcomes(model, tokenizer, resolve_task(args.task), spec)
    correct = list(outcomes.correct)
    accuracy = accuracy_record(None, correct)
    seconds = time.perf_counter() - start
    print(f"held-out accuracy (greedy, first {args.eval_n} {args.task} test prompts): "
          f"{interval_text(accuracy)} in {seconds:.0f} s")
    if args.json:
        print(to_json({"accuracy": accuracy["after"], "accuracy_ci95_low": accuracy["after_ci95_low"],
                       "accuracy_ci95_high": accuracy["after_ci95_high"], "eval_n": len(correct), "task": args.task,
                       "strict_accuracy": sum(outcomes.strict) / len(correct), "correct": [int(x) for x in correct],
                       "strict_correct": [int(x) for x in outcomes.strict],
                       "model": describe_model(args.model), "max_completion_length": args.max_completion_length,
                       "bf16": spec.bf16, "precision": spec.precision.name, "precision_reason": spec.precision.reason,
                       "seconds": seconds}))


def analyze(args) -> None:
    from ..metrics import compare_weights, linear_weights
    from .report import write_analysis_report

    tuned_path = tuned_checkpoint(args.tuned)
    target = Path(args.output) if args.output else default_output("analyze")
    with output_folder(target) as tmp:
        base_model = load(args.base, option="BASE")[0]
        check_top_k(base_model, args.top_k)
        tuned_model = load_tuned(args.base, tuned_path)[0]
        try:
            records, summary = compare_weights(linear_weights(base_model), linear_weights(tuned_model), k=args.top_k,
                                               alpha=args.alpha)
        except (KeyError, ValueError) as exc:
            raise UsageError(f"TUNED {args.tuned}: does not match BASE ({' '.join(str(exc).split())}); "
                           "pass a checkpoint tuned from BASE") from exc
        facts = {"base": describe_model(args.base), "tuned": str(tuned_path), "top-k": args.top_k, "alpha": args.alpha}
        report = write_analysis_report(tmp, records, summary, facts)
    print(f"NSS {summary['mean_nss']:.3g}  max angle L/R {summary['mean_max_angle_left']:.3g}°/"
          f"{summary['mean_max_angle_right']:.3g}°  bf16 sparsity {summary['update_sparsity']:.3f}")
    print(f"report: {target / report.name}")


def demo_batch(tokenizer, n: int):
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


def demo(args) -> None:
    import torch
    from peft import get_peft_model

    from ..tuner import OffPrincipalConfig, max_principal_leak

    torch.manual_seed(args.seed)
    model, tokenizer = load(args.model, dtype={"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype])
    check_top_k(model, args.top_k)
    t = time.perf_counter()
    config = OffPrincipalConfig(r=args.rank, alpha=args.rank, top_k=args.top_k, target_modules="all-linear")
    model = get_peft_model(model, config)
    print(f"adapter attached in {time.perf_counter() - t:.1f} s (principal bases of every linear weight, cached)")
    model.print_trainable_parameters()
    batch = demo_batch(tokenizer, args.batch)
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
