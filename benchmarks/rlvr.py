"""RLVR benchmark: OffPrincipal against its random-subspace control, LoRA, DoRA, PiSSA, MiCA, GeoRA, OSF, full FT,
sparse-FT masks and SFT.

Every arm is one ``offprincipal train`` run (GRPO through TRL) with the same model, task, prompts (same seed → same
prompt order), generations, completion length, steps and held-out set; the base model's held-out accuracy is
measured once per suite (``offprincipal evaluate``). Each finished run becomes one JSON record,
``<results>/<suite>/records/<run_id>.json``, written atomically; a re-run skips every run that has a record (the
suite resumes after an interruption). Run folders (logs, metrics, reports; weights deleted unless --keep-weights)
go to ``runs/rlvr/<suite>/`` (not committed). ``benchmarks/rlvr_report.py`` turns the records into report.md.
A record carries the per-prompt 0/1 outcomes of the base model and of the run (lenient and strict scoring) and names
the run's completions, kept beside it as ``<run_id>.completions.jsonl.gz``. Arms beyond the default plan are named
with ``--arm METHOD[:lr=LR][:k=K][:seeds=N][:first=S][:tag=WORD]`` (e.g. the controls of issue 18; a tag re-runs
an arm under its own run ids, e.g. to record what its old records lack).

Learning rates: a sweep on seed 0 for ``lora``, ``offprincipal`` and ``full`` picks, per swept method, the rate with
the highest mean training reward over all steps (never the held-out set); the other methods take the rate of their
family (``Method.family`` in :mod:`offprincipal.experiment.methods`). The sweep's runs at the chosen rate are the seed-0 runs of the comparison
(``role: "main"``); the others stay in the records with ``role: "sweep"``. The choice is in ``lr_selection.json``.

    .venv/bin/python benchmarks/rlvr.py run                 # the whole suite, resumable (hours on a 2-core CPU)
    .venv/bin/python benchmarks/rlvr.py run --dry-run       # the plan, and what is done
    .venv/bin/python benchmarks/rlvr.py report              # report.md + plots from the records so far
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional


from offprincipal.experiment.evaluation import RETENTION_N
from offprincipal.experiment.methods import METHODS, canonical_name, get_method

ROOT = Path(__file__).resolve().parent.parent
# the methods run with several seeds by default; every other method of the registry runs with Suite.single_seeds.
# A method without a sweep of its own takes the rate its family's sweep chose (Method.family)
MULTI_SEED = ("full", "offprincipal-full", "lora", "pissa", "offprincipal")
SINGLE_SEED = tuple(name for name in METHODS if name not in MULTI_SEED)


@dataclass(frozen=True)
class Suite:
    """Settings shared by every run of a suite (the defaults are the committed CPU suite)."""

    name: str = "smollm2-arithmetic-cpu"
    model: str = "embedded"
    task: str = "arithmetic"
    steps: int = 16
    num_generations: int = 8
    prompts_per_step: int = 1
    max_completion_length: int = 48
    temperature: float = 0.7
    eval_n: int = 200
    rank: int = 16
    top_k: int = 32
    metrics_k: int = 32
    bf16: Optional[bool] = True  # None: the precision `offprincipal train` picks for the hardware
    device: str = "cpu"
    seeds: int = 3  # of the multi-seed methods (MULTI_SEED)
    single_seeds: int = 1  # of the others (the top-k ablation: always seed 0 only)
    sweep: dict = field(default_factory=lambda: {"lora": (2e-4, 1e-3), "offprincipal": (2e-4, 1e-3), "full": (2e-5, 1e-4)})
    ablation_top_k: tuple = (8, 128)
    # arms at a fixed rate besides their family's chosen one (as many seeds as the multi-seed methods): LoRA and
    # PiSSA at OffPrincipal's rate, so that the comparison does not hinge on the sweep's choice for LoRA
    fixed_lr: tuple = (("lora", 2e-4), ("pissa", 2e-4))
    # the multi-seed methods, in the order each seed runs them (a suite cut short has the first ones done)
    methods: tuple = MULTI_SEED
    first: tuple = ()  # arms run (all their seeds) before every other arm
    # stability sweep: method → rates, each at seeds 0 … stability_seeds-1 (a run the comparison already has at the
    # same method, rate, seed and top-k is not repeated); the report tabulates every record by (method, rate)
    stability: dict = field(default_factory=dict)
    stability_seeds: int = 2
    retention: bool = False  # forgetting measured in every run (the committed 16-step suite predates it)
    # extra arms named one by one (--arm METHOD[:lr=LR][:k=K][:seeds=N]), run after the main arms in the order given,
    # each arm's seeds together; e.g. the controls of issue 18
    extra: tuple = ()

    def settings(self) -> dict:
        keys = ("model", "task", "steps", "num_generations", "prompts_per_step", "max_completion_length",
                "temperature", "eval_n", "rank", "top_k", "metrics_k", "bf16", "device", "retention")
        return {key: getattr(self, key) for key in keys}


def _non_negative(value: str) -> int:
    if int(value) < 0:
        raise ValueError(value)
    return int(value)


def _tag(value: str) -> str:
    if not re.fullmatch(r"[a-z][a-z0-9]*", value):
        raise ValueError(value)
    return value


@dataclass(frozen=True)
class ExtraArm:
    """An arm named on the command line: a method of the registry at a rate (default: the method's default rate)
    and top-k (default: the suite's), with seeds 0 … seeds-1 (default: the suite's ``seeds``). A ``tag`` makes a
    second arm of the same settings with its own run ids (``…-s0-TAG``) and name (``"offprincipal rerun"``): a
    re-run of an arm whose old records lack fields that later code records (e.g. per-prompt outcomes)."""

    method: str
    lr: Optional[float] = None
    top_k: Optional[int] = None
    seeds: Optional[int] = None
    tag: Optional[str] = None
    first: int = 0  # the first seed: seeds first … first+seeds-1 (a second process can take an arm's later seeds)

    def name(self, suite: "Suite") -> str:
        """``method``, then `` lr=…`` when a rate is given, `` k=…`` when k differs from the suite's and `` TAG``
        (the names the report's arm rules know: "lora lr=0.0001", "offprincipal k=8", "offprincipal rerun")."""
        return (self.method + ("" if self.lr is None else f" lr={self.lr:g}")
                + ("" if self.top_k in (None, suite.top_k) else f" k={self.top_k}")
                + ("" if self.tag is None else f" {self.tag}"))

    def specs(self, suite: "Suite", order: int) -> list["RunSpec"]:
        lr = self.lr if self.lr is not None else get_method(self.method).default_lr
        seeds = self.seeds if self.seeds is not None else suite.seeds
        return [RunSpec(self.method, seed, lr, self.top_k or suite.top_k, self.name(suite), extra=order,
                        tag=self.tag or "") for seed in range(self.first, self.first + seeds)]

    @classmethod
    def parse(cls, text: str) -> "ExtraArm":
        """``METHOD[:lr=LR][:k=K][:seeds=N][:first=S][:tag=WORD]`` → an ExtraArm; SystemExit naming the flag and
        the form otherwise."""
        method, *options = text.split(":")
        method = canonical_name(method)
        if method not in METHODS:
            raise SystemExit(f"rlvr: --arm {text!r}: {method!r} is not a method; choose from {', '.join(METHODS)}")
        values = {}
        for option in options:
            key, _, value = option.partition("=")
            kind = {"lr": float, "k": int, "seeds": int, "tag": _tag, "first": _non_negative}.get(key)
            try:
                values[{"k": "top_k"}.get(key, key)] = kind(value)
            except (TypeError, ValueError):
                raise SystemExit(f"rlvr: --arm {text!r}: expected METHOD[:lr=LR][:k=K][:seeds=N][:first=S][:tag=WORD] "
                                 "(WORD: lower-case letters and digits), e.g. lora:lr=1e-4:seeds=2, offprincipal:k=8:seeds=2 "
                                 "or offprincipal:seeds=3:tag=rerun") from None
        return cls(method, **values)


@dataclass(frozen=True)
class RunSpec:
    """One ``offprincipal train`` run of the suite."""

    method: str
    seed: int
    lr: float
    top_k: int
    arm: str
    sweep: bool = False  # part of the learning-rate sweep (seed 0 of a swept method)
    fixed_lr: bool = False  # an arm of Suite.fixed_lr (its own run ids: seed 0 may repeat a sweep run, on purpose)
    stability: bool = False  # a run of the stability sweep (Suite.stability) that the comparison does not have
    extra: int = -1  # position of its arm in Suite.extra (-1: not an extra arm)
    tag: str = ""  # of an ExtraArm: its run ids end in -TAG

    @property
    def run_id(self) -> str:
        return (f"{self.method}-k{self.top_k}-lr{self.lr:g}-s{self.seed}" + ("-fixed" if self.fixed_lr else "")
                + (f"-{self.tag}" if self.tag else ""))

    @property
    def role(self) -> str:
        return "stability" if self.stability else "main"


class Paths:
    """Where a suite keeps its records (committed) and its run folders (scratch)."""

    def __init__(self, suite: Suite, results: Path, runs: Path):
        self.folder = results / suite.name
        self.records = self.folder / "records"
        self.runs = runs / suite.name
        self.base = self.folder / "base_accuracy.json"
        self.selection = self.folder / "lr_selection.json"

    def migrate(self) -> list[Path]:
        """Rewrite records written under a former spelling of a method (``full-offprincipal``) to the registry's
        (method, arm and run_id, and the file's name); returns the files rewritten. Idempotent."""
        moved = []
        for path in sorted(self.records.glob("*.json")):
            record = json.loads(path.read_text())
            method = canonical_name(record.get("method", ""))
            if method == record.get("method"):
                continue
            old = record["method"]
            record.update(method=method, arm=record["arm"].replace(old, method, 1),
                          run_id=record["run_id"].replace(old, method, 1))
            _write_json(self.record(record["run_id"]), record)
            path.unlink()
            moved.append(path)
        return moved

    def record(self, run_id: str) -> Path:
        return self.records / f"{run_id}.json"

    def done(self) -> dict[str, dict]:
        return {p.stem: json.loads(p.read_text()) for p in sorted(self.records.glob("*.json"))}


# --- the plan -----------------------------------------------------------------------------------------------------


def sweep_specs(suite: Suite) -> list[RunSpec]:
    return [RunSpec(m, 0, lr, suite.top_k, m, sweep=True) for m, lrs in suite.sweep.items() for lr in lrs]


def select_lr(suite: Suite, done: dict[str, dict]) -> dict[str, dict]:
    """Swept method → {"lr", "mean_reward" per lr} once all its sweep runs have records (highest mean reward wins;
    ties go to the smaller rate)."""
    chosen = {}
    for method, lrs in suite.sweep.items():
        runs = [done.get(RunSpec(method, 0, lr, suite.top_k, method).run_id) for lr in lrs]
        if all(runs):
            rewards = {f"{lr:g}": _mean(r["reward_curve"]) for lr, r in zip(lrs, runs)}
            best = max(sorted(lrs), key=lambda lr: rewards[f"{lr:g}"])
            chosen[method] = {"lr": best, "mean_reward": rewards}
    return chosen


def plan(suite: Suite, chosen: dict[str, dict]) -> list[RunSpec]:
    """Every run of the suite whose learning rate is known: the sweep, then (once their family's rate is chosen, or
    at the CLI's default rate for a family without a sweep) the seeds of each method and the top-k ablation of
    OffPrincipal. Sweep runs come first (they unblock the rest), then seed 0 of every arm, seed 1, …"""

    specs = sweep_specs(suite)
    for method in (*suite.methods, *(m for m in SINGLE_SEED if m not in suite.methods)):
        family = method if method in suite.sweep else get_method(method).family  # its own sweep, if it has one
        if family in suite.sweep and family not in chosen:
            continue  # waits for its family's sweep
        lr = chosen[family]["lr"] if family in chosen else get_method(family).default_lr
        seeds = range(suite.seeds if method in suite.methods else suite.single_seeds)
        specs += [RunSpec(method, seed, lr, suite.top_k, method) for seed in seeds]
        if method == "offprincipal":
            specs += [RunSpec(method, 0, lr, k, f"offprincipal k={k}") for k in suite.ablation_top_k]
    for method, lr in suite.fixed_lr:
        specs += [RunSpec(method, seed, lr, suite.top_k, f"{method} lr={lr:g}", fixed_lr=True)
                  for seed in range(suite.seeds)]
    for order, arm in enumerate(suite.extra):
        specs += arm.specs(suite, order)
    planned = {(s.method, s.seed, s.lr, s.top_k) for s in specs}
    for seed in range(suite.stability_seeds):
        for method, lrs in suite.stability.items():
            specs += [RunSpec(method, seed, lr, suite.top_k, f"{method} lr={lr:g}", stability=True) for lr in lrs
                      if (method, seed, lr, suite.top_k) not in planned]
    unique = {}
    for spec in specs:
        unique.setdefault(spec.run_id, spec)
    # seed-major: a suite cut short (or extended with more seeds) has every arm at about the same number of seeds;
    # within a seed, the order of Suite.methods (then the fixed-rate arms, then the rest); Suite.first arms go first,
    # then the extra arms (Suite.extra) in the order given, each arm's seeds together; the stability sweep last
    return sorted(unique.values(), key=lambda spec: (not spec.sweep, spec.stability, spec.extra,
                                                     spec.arm not in suite.first, spec.seed))


def role(spec: RunSpec, chosen: dict[str, dict]) -> str:
    """"main" for a run of the comparison, "sweep" for a sweep run at a rate that was not chosen (or not yet),
    "stability" for a run of the stability sweep only."""
    if not spec.sweep:
        return spec.role
    return "main" if spec.method in chosen and chosen[spec.method]["lr"] == spec.lr else "sweep"


# --- one run --------------------------------------------------------------------------------------------------------


def _executable() -> str:
    """The ``offprincipal`` console script of this interpreter's environment."""
    script = Path(sys.executable).parent / "offprincipal"
    if not script.exists():
        raise SystemExit(f"rlvr: {script} not found; install the project (`make test` or `pip install -e .`)")
    return str(script)


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false"}


def train_command(suite: Suite, spec: RunSpec, output: Path) -> list[str]:
    s = suite
    args = [
        _executable(), "train", "--method", spec.method, "--model", s.model, "--task", s.task, "--steps", s.steps,
        "--lr", spec.lr, "--rank", s.rank, "--top-k", spec.top_k, "--metrics-k", s.metrics_k,
        "--num-generations", s.num_generations, "--prompts-per-step", s.prompts_per_step,
        "--max-completion-length", s.max_completion_length, "--temperature", s.temperature, "--eval-n", s.eval_n,
        "--no-eval-before", *_precision_flag(s), "--device", s.device, "--seed", spec.seed,
        *(["--retention", "--retention-n", RETENTION_N] if s.retention else ["--no-retention"]), "--output", output,
    ]
    return [str(a) for a in args]


def _precision_flag(suite: Suite) -> list[str]:
    return [] if suite.bf16 is None else ["--bf16" if suite.bf16 else "--no-bf16"]


def _evaluate_base(suite: Suite, task: str, eval_n: int, threads: int) -> dict:
    s = suite
    command = [_executable(), "evaluate", s.model, "--task", task, "--eval-n", eval_n,
               "--max-completion-length", s.max_completion_length, *_precision_flag(s), "--device", s.device, "--json"]
    print(f"base model: held-out accuracy on {task} ...", flush=True)
    out = subprocess.run([str(a) for a in command], env=_env(threads), capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"rlvr: base evaluation failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def base_accuracy(suite: Suite, paths: Paths, threads: int) -> dict:
    """The base model's held-out accuracy, and with retention its accuracy on the retention task (measured once per
    suite, kept in base_accuracy.json; the runs skip their own before-evaluation)."""
    result = json.loads(paths.base.read_text()) if paths.base.exists() else {}
    if "accuracy" not in result:
        result = _evaluate_base(suite, suite.task, suite.eval_n, threads)
        _write_json(paths.base, result)
    if "correct" not in result:  # measured before the per-prompt outcomes were kept (issue 18): add them
        again = _evaluate_base(suite, suite.task, suite.eval_n, threads)
        if again["accuracy"] != result["accuracy"]:
            print(f"base model: the re-evaluation gives {100 * again['accuracy']:.1f}% against the recorded "
                  f"{100 * result['accuracy']:.1f}% (precision {again.get('precision')}); the per-prompt outcomes "
                  "are the new evaluation's, 'accuracy' stays what the earlier records used", flush=True)
        result.update({key: again[key] for key in ("correct", "strict_correct", "strict_accuracy")},
                      per_prompt_accuracy=again["accuracy"], per_prompt_precision=again.get("precision"))
        _write_json(paths.base, result)
    if suite.retention and "retention_task" not in result:
        from offprincipal.experiment.retention import RETENTION_TASK

        result["retention_task"] = _evaluate_base(suite, RETENTION_TASK, RETENTION_N, threads)
        _write_json(paths.base, result)
    print(f"base model: {100 * result['accuracy']:.1f}% held-out", flush=True)
    return result


def _mean(values) -> Optional[float]:
    values = [v for v in values or [] if v is not None]
    return sum(values) / len(values) if values else None


def _commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    head = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no", "--", "offprincipal", "kernels") else "")


def make_record(suite: Suite, spec: RunSpec, folder: Path, base: dict, workers: int, device: str) -> dict:
    """The JSON record of a finished run folder of ``offprincipal train``."""
    from offprincipal.experiment.records import read_summary

    summary = read_summary(folder / "summary.json")
    run, metrics = summary["run"], summary["parameter_metrics"]
    logs = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    layers = [json.loads(line) for line in (folder / "layers.jsonl").read_text().splitlines()]
    rewards = [r["reward"] for r in logs if "reward" in r] or None
    leaks = [metrics["mean_leak_left"], metrics["mean_leak_right"]]
    accuracy = summary["accuracy"]
    return {
        "suite": suite.name, "run_id": spec.run_id, "method": spec.method, "arm": spec.arm, "role": "main",
        "seed": spec.seed, "steps": suite.steps, "lr": spec.lr, "rank": suite.rank if get_method(spec.method).has_rank else None,
        "top_k": spec.top_k, "metrics_k": suite.metrics_k,
        "accuracy_before": base["accuracy"], "accuracy_after": summary["accuracy"]["after"], "eval_n": suite.eval_n,
        "accuracy_after_ci95_low": summary["accuracy"].get("after_ci95_low"),
        "accuracy_after_ci95_high": summary["accuracy"].get("after_ci95_high"),
        **_outcome_fields(spec, accuracy, base),
        **_retention_fields(summary.get("retention"), base),
        "precision": run["precision"], "precision_reason": run["precision_reason"],
        "reward_first": run.get("reward_first_fifth"), "reward_last": run.get("reward_last_fifth"),
        "reward_curve": rewards, "loss_curve": [r.get("loss") for r in logs],
        "grad_norm_curve": [r.get("grad_norm") for r in logs], "entropy_curve": [r.get("entropy") for r in logs],
        "step_time_s": _mean([r["step_time"] for r in logs[1:]] or [r["step_time"] for r in logs]),
        "train_seconds": run["train_seconds"], "peak_mem_mb": run["peak_memory_mb"],
        "trainable_params": run["trainable_params"],
        "nss_mean": metrics["mean_nss"], "update_rel_mean": metrics.get("mean_update_rel"),
        "max_angle_mean": _mean([metrics["mean_max_angle_left"], metrics["mean_max_angle_right"]]),
        "bf16_sparsity": metrics["update_sparsity"], "overlap_principal": metrics["mean_overlap_principal"],
        "overlap_lowmag": metrics["mean_overlap_low_magnitude"],
        "leak": max((v for v in leaks if v is not None), default=None),
        "layer_names": [r["name"] for r in layers], "layer_nss": [r["nss"] for r in layers],
        "layer_max_angle": [_mean([r["max_angle_left"], r["max_angle_right"]]) for r in layers],
        "device": device, "commit": _commit(), "workers": workers, "settings": suite.settings(),
        "load_average": f"{run.get('load_average_start')} / {run.get('load_average_end')}",
    }


COMPLETIONS_SUFFIX = ".completions.jsonl.gz"


def _outcome_fields(spec: RunSpec, accuracy: dict, base: dict) -> dict:
    """The record's per-prompt outcomes (0/1 lists in prompt order, length eval_n): after training from the run,
    before training from the base model's evaluation of the suite (``base_accuracy.json``), each lenient and strict;
    the strict accuracies, the share of prompts the two rules disagree on, and the completions file beside the record.
    Empty for runs that predate them."""
    if accuracy.get("after_correct") is None:
        return {}
    return {
        "correct_before": base.get("correct"), "correct_after": accuracy["after_correct"],
        "strict_correct_before": base.get("strict_correct"), "strict_correct_after": accuracy["after_strict_correct"],
        "accuracy_strict_before": base.get("strict_accuracy"), "accuracy_strict_after": accuracy["strict_after"],
        "lenient_strict_disagree": accuracy["after_lenient_strict_disagree"],
        "completions_file": spec.run_id + COMPLETIONS_SUFFIX if accuracy.get("completions_file") else None,
    }


def _retention_fields(retention: Optional[dict], base: dict) -> dict:
    """The record's forgetting figures: NLL drift of the base model's own answers, the KL from the base to the tuned
    model on those answer positions (``retention_kl``, nats/token, over the base's top-m tokens and the rest as one
    bucket; None in runs that predate it), and the retention task's accuracy after training next to the base
    model's (measured once per suite)."""
    if retention is None:
        return {}
    task = retention.get("task_accuracy") or {}
    before = (base.get("retention_task") or {}).get("accuracy")
    return {
        "retention_nll_drift": retention["nll_drift_nats_per_token"],
        "retention_kl": retention.get("kl_to_base_nats_per_token"), "retention_kl_top_m": retention.get("kl_top_m"),
        "retention_base_nll": retention["base_nll_nats_per_token"], "retention_prompts": retention["prompts"],
        "retention_task": retention.get("task"), "retention_task_n": task.get("after_n"),
        "retention_task_before": before, "retention_task_after": task.get("after"),
        "retention_task_delta": None if before is None or task.get("after") is None else task["after"] - before,
    }


def _write_json(path: Path, data: dict) -> None:
    from offprincipal.experiment.report import to_json, write_text_atomic

    write_text_atomic(path, to_json(data, indent=1) + "\n")


# --- the scheduler ----------------------------------------------------------------------------------------------------


def _device(suite: Suite, workers: int, threads: int) -> str:
    """The machine (the load average of each run is in its record's ``load_average``)."""
    if suite.device == "cuda":
        import torch

        machine = torch.cuda.get_device_name()
    else:
        from offprincipal.experiment.hardware import cpu_name

        machine = f"{cpu_name()} CPU, {os.cpu_count()} cores, no GPU"
    return f"{machine}; {workers} concurrent run(s), {threads} torch thread(s) each"


def _finish(suite, paths, spec, folder, base, workers, device, keep_weights) -> None:
    record = make_record(suite, spec, folder, base, workers, device)
    chosen = select_lr(suite, {**paths.done(), spec.run_id: record})
    record["role"] = role(spec, chosen)
    if record.get("completions_file"):  # first, so that a record never names a missing file
        from offprincipal.experiment.records import COMPLETIONS_FILE
        from offprincipal.files import write_bytes_atomic

        write_bytes_atomic(paths.records / record["completions_file"], (folder / COMPLETIONS_FILE).read_bytes())
    _write_json(paths.record(spec.run_id), record)
    if not keep_weights:
        for sub in ("model", "adapter"):
            shutil.rmtree(folder / sub, ignore_errors=True)
    _update_roles(suite, paths, chosen)


def _update_roles(suite: Suite, paths: Paths, chosen: dict) -> None:
    """Rewrite the roles of sweep records once their method's rate is chosen, and lr_selection.json."""
    if chosen:
        _write_json(paths.selection, {"criterion": "highest mean training reward over all steps, seed 0", **chosen})
    for run_id, record in paths.done().items():
        spec = RunSpec(record["method"], record["seed"], record["lr"], record["top_k"], record["arm"],
                       sweep=record["method"] in suite.sweep and record["arm"] == record["method"]
                       and record["seed"] == 0 and record["top_k"] == suite.top_k,
                       stability=record["role"] == "stability")
        if record["role"] != role(spec, chosen):
            _write_json(paths.record(run_id), {**record, "role": role(spec, chosen)})


def run_suite(suite: Suite, paths: Paths, workers: int, threads: int, keep_weights: bool, dry_run: bool) -> int:
    """Runs every planned run without a record, ``workers`` at a time; returns the number of failed runs."""
    paths.records.mkdir(parents=True, exist_ok=True)
    paths.runs.mkdir(parents=True, exist_ok=True)
    if not dry_run:
        paths.migrate()
    if dry_run:
        done = paths.done()
        chosen = select_lr(suite, done)
        for spec in plan(suite, chosen):
            print(f"{'done' if spec.run_id in done else 'todo'}  {spec.run_id}  ({spec.arm})")
        waiting = sorted(set(suite.sweep) - set(chosen))
        print(f"learning rates chosen: { {m: c['lr'] for m, c in chosen.items()} or 'none yet'}"
              + (f"; the methods that take the rate of {', '.join(waiting)} are not listed yet" if waiting else ""))
        return 0
    lock = open(paths.runs / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit(f"rlvr: another `run` of suite {suite.name} is in progress ({paths.runs / '.lock'} is locked)")
    for leftover in paths.runs.glob(".*.tmp-*"):  # temporary folders of runs that were interrupted
        shutil.rmtree(leftover, ignore_errors=True)
    base = base_accuracy(suite, paths, threads * workers)
    device = _device(suite, workers, threads)
    running: dict[str, tuple[RunSpec, subprocess.Popen, float]] = {}
    failed: list[str] = []
    while True:
        done = paths.done()  # read once per pass: every record file is parsed
        chosen = select_lr(suite, done)
        todo = [s for s in plan(suite, chosen) if s.run_id not in done and s.run_id not in running
                and s.run_id not in failed]
        while todo and len(running) < workers:
            spec = todo.pop(0)
            folder = paths.runs / spec.run_id
            if (folder / "summary.json").exists():  # finished before an interruption, record not yet written
                _finish(suite, paths, spec, folder, base, workers, device, keep_weights)
                continue
            shutil.rmtree(folder, ignore_errors=True)
            with open(paths.runs / f"{spec.run_id}.log", "w") as log:  # the child keeps its own descriptor
                proc = subprocess.Popen(train_command(suite, spec, folder), env=_env(threads), stdout=log, stderr=log)
            running[spec.run_id] = (spec, proc, time.time())
            print(f"start  {spec.run_id}  ({len(paths.done())} done, {len(running)} running)", flush=True)
        if not running:
            break
        time.sleep(2)
        for run_id, (spec, proc, started) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[run_id]
            minutes = (time.time() - started) / 60
            if proc.returncode:
                failed.append(run_id)
                print(f"FAIL   {run_id}  exit {proc.returncode} after {minutes:.1f} min; log: "
                      f"{paths.runs / f'{run_id}.log'}", flush=True)
                continue
            _finish(suite, paths, spec, paths.runs / run_id, base, workers, device, keep_weights)
            acc = paths.done()[run_id]["accuracy_after"]
            print(f"done   {run_id}  {minutes:.1f} min  held-out {100 * acc:.1f}%", flush=True)
    return len(failed)


# --- command line ----------------------------------------------------------------------------------------------------


def _rates(items: list[str], flag: str) -> dict[str, tuple[float, ...]]:
    """``["lora=2e-4,1e-3", …]`` → ``{"lora": (2e-4, 1e-3), …}``, refusing what is not METHOD=LR[,LR…]."""
    rates = {}
    for item in items:
        method, _, lrs = item.partition("=")
        try:
            rates[canonical_name(method)] = tuple(float(lr) for lr in lrs.split(","))
        except ValueError:
            raise SystemExit(f"rlvr: {flag} {item!r}: expected METHOD=LR[,LR…], e.g. lora=2e-4,1e-3") from None
        if canonical_name(method) not in METHODS:
            raise SystemExit(f"rlvr: {flag} {item!r}: {method!r} is not a method; choose from {', '.join(METHODS)}")
    return rates


def _suite_from(args) -> Suite:
    defaults = Suite()
    overrides = {key: getattr(args, key) for key in defaults.settings() if getattr(args, key, None) is not None}
    if args.auto_precision:
        overrides["bf16"] = None
    if args.suite:
        overrides["name"] = args.suite
    if args.seeds is not None:
        overrides["seeds"] = args.seeds
    if args.methods:
        unknown = sorted(set(args.methods) - set(METHODS))
        if unknown:
            raise SystemExit(f"rlvr: --methods {' '.join(unknown)}: not a method; choose from {', '.join(METHODS)}")
        overrides["methods"] = tuple(args.methods)
    if args.single_seeds is not None:
        overrides["single_seeds"] = args.single_seeds
    if args.first:
        overrides["first"] = tuple(args.first)
    if args.sweep is not None:
        overrides["sweep"] = _rates(args.sweep, "--sweep")
    if args.fixed_lr is not None:
        overrides["fixed_lr"] = tuple((m, float(lr)) for m, lr in (item.split("=") for item in args.fixed_lr))
    if args.ablation_top_k is not None:
        overrides["ablation_top_k"] = tuple(args.ablation_top_k)
    if args.stability:
        overrides["stability"] = _rates(args.stability, "--stability")
    if args.stability_seeds is not None:
        overrides["stability_seeds"] = args.stability_seeds
    if args.arm:
        overrides["extra"] = tuple(ExtraArm.parse(text) for text in args.arm)
    return Suite(**overrides)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["run", "report"])
    p.add_argument("--suite", default=None, help=f"suite name (default: {Suite.name})")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="records go to RESULTS/SUITE")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "rlvr", help="scratch run folders go to RUNS/SUITE")
    p.add_argument("--workers", type=int, default=2, help="concurrent runs (default: 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default: 1)")
    p.add_argument("--keep-weights", action="store_true", help="keep the trained weights of every run folder")
    p.add_argument("--dry-run", action="store_true", help="print the plan and what is done")
    g = p.add_argument_group("suite settings (defaults: the committed CPU suite)")
    for key, value in Suite().settings().items():
        if key == "bf16":
            g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
            g.add_argument("--auto-precision", dest="auto_precision", action="store_true",
                           help="let each run pick bf16 or fp32 for the hardware (records say which and why)")
        elif key == "retention":
            g.add_argument("--retention", action=argparse.BooleanOptionalAction, default=None,
                           help="measure forgetting in every run (NLL drift, the capitals task)")
        else:
            g.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None)
    g.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                   help=f"the multi-seed methods, in the order each seed runs them (default: {' '.join(MULTI_SEED)})")
    g.add_argument("--seeds", type=int, default=None, help="seeds of the multi-seed methods (default: 3)")
    g.add_argument("--single-seeds", type=int, default=None, help="seeds of the other methods (default: 1)")
    g.add_argument("--sweep", nargs="*", default=None, metavar="METHOD=LR,LR",
                   help="learning-rate sweep (default: lora=2e-4,1e-3 offprincipal=2e-4,1e-3 full=2e-5,1e-4; none: pass "
                        "the flag alone, and every method runs at the CLI's default rate)")
    g.add_argument("--first", nargs="+", default=None, metavar="ARM",
                   help="arms that run all their seeds before the others (e.g. offprincipal lora full)")
    g.add_argument("--fixed-lr", nargs="*", default=None, metavar="METHOD=LR",
                   help="extra arms at a fixed rate (default: lora=2e-4 pissa=2e-4; none: pass the flag alone)")
    g.add_argument("--ablation-top-k", type=int, nargs="*", default=None,
                   help="OffPrincipal top-k ablation (default: 8 128; none: pass the flag alone)")
    g.add_argument("--stability", nargs="+", default=None, metavar="METHOD=LR,LR",
                   help="stability sweep: each method at each rate, --stability-seeds seeds (runs the comparison "
                        "already has are not repeated), e.g. offprincipal=2e-4,1e-3,3e-3 lora=2e-4,1e-3,3e-3")
    g.add_argument("--stability-seeds", type=int, default=None, help="seeds of the stability sweep (default: 2)")
    g.add_argument("--arm", nargs="+", default=None, metavar="METHOD[:lr=LR][:k=K][:seeds=N][:first=S][:tag=WORD]",
                   help="extra arms, run after the others in the order given, e.g. offprincipal-random:seeds=3 "
                        "lora:lr=1e-4:seeds=2 offprincipal:k=8:seeds=2 (rate: the method's default; k: --top-k; "
                        "seeds: --seeds; first: the first seed, default 0; tag: a second arm of the same settings under run ids ending in -TAG, e.g. "
                        "offprincipal:seeds=3:tag=rerun)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    suite = _suite_from(args)
    paths = Paths(suite, args.results, args.runs)
    if args.command == "run":
        failed = run_suite(suite, paths, args.workers, args.threads, args.keep_weights, args.dry_run)
        if failed:
            print(f"rlvr: {failed} run(s) failed (see their logs); re-run to retry them", file=sys.stderr)
            return 1
    if args.command == "report" and paths.records.exists():
        paths.migrate()
    if not args.dry_run and paths.records.exists() and any(paths.records.glob("*.json")):
        import importlib.util

        spec = importlib.util.spec_from_file_location("rlvr_report", Path(__file__).with_name("rlvr_report.py"))
        report = sys.modules["rlvr_report"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(report)
        print(f"report: {report.write_report(paths.folder)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
