"""The record of one ``offprincipal train`` run: ``summary.json``.

Keys are identifiers (snake_case, units in the names), numbers are numbers and booleans are booleans; display
labels belong to the report. :class:`RunFacts` is the ``run`` part (settings, timings, machine, reward summary);
:func:`write_summary` writes the whole record, :func:`read_summary` reads it back — also the format-1 records of
earlier versions, whose ``run`` part used display labels as keys (``"train seconds"``, ``"bf16": "False"``).

    {"format": 2, "run": RunFacts, "accuracy": {...}, "retention": {...} | null, "parameter_metrics": {...}}

``accuracy`` (:func:`~offprincipal.experiment.evaluation.outcome_record`): ``before``/``after`` (lenient: the last
number of the completion), their intervals and the paired gain; since issue 18 also the per-prompt outcomes as 0/1
lists of length ``eval_n`` in prompt order (``before_correct``, ``after_correct``, ``before_strict_correct``,
``after_strict_correct``; null when not evaluated), the strict accuracies ``strict_before``/``strict_after``, the
fraction of prompts where lenient and strict disagree, and ``completions_file``: the final evaluation's completions
(:data:`COMPLETIONS_FILE`, :func:`write_completions`) beside ``summary.json``. Older records lack these keys;
readers take them with ``.get``.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from ..files import to_json, write_bytes_atomic, write_json
from .methods import canonical_name

SUMMARY_FORMAT = 2


@dataclass(frozen=True)
class RunFacts:
    """Settings, timings and machine of one run (the ``run`` part of ``summary.json``)."""

    method: str
    task: str
    model: str  # what the user passed ("embedded" for the embedded SmolLM2-135M-Instruct)
    base_model: Optional[str]  # how to load the base again: "embedded", an absolute path, or a hub id
    base_fingerprint: Optional[str]  # BLAKE2b over the base's linear weights (None in format-1 records)
    device: str
    precision: str  # "bf16" (autocast) or "fp32"
    precision_reason: Optional[str]
    steps: int
    learning_rate: float
    rank: Optional[int]  # None for methods without a rank
    top_k: int
    metrics_k: int
    num_generations: int
    prompts_per_step: int
    max_completion_length: int
    temperature: float
    seed: int
    train_seconds: float
    wall_seconds: float
    peak_memory_mb: Optional[float]
    trainable_params: Optional[int]
    load_average_start: Optional[float] = None
    load_average_end: Optional[float] = None
    reward_first_fifth: Optional[float] = None
    reward_last_fifth: Optional[float] = None
    machine: dict = field(default_factory=dict)

    @property
    def bf16(self) -> bool:
        return self.precision == "bf16"


def write_summary(folder: Union[str, Path], facts: RunFacts, accuracy: Mapping, retention: Optional[Mapping],
                  parameter_metrics: Mapping) -> Path:
    """``folder/summary.json`` (strict JSON, written atomically)."""
    return write_json(Path(folder) / "summary.json", {
        "format": SUMMARY_FORMAT, "run": asdict(facts), "accuracy": dict(accuracy),
        "retention": None if retention is None else dict(retention), "parameter_metrics": dict(parameter_metrics),
    })


COMPLETIONS_FILE = "completions.jsonl.gz"


def write_completions(path: Union[str, Path], held_out) -> Path:
    """One JSON line per prompt of a :class:`~offprincipal.experiment.tasks.HeldOut` (question, answer, completion,
    correct, strict), gzip-compressed (mtime 0: the same evaluation gives the same bytes), written atomically."""
    text = "".join(to_json(row) + "\n" for row in held_out.rows())
    return write_bytes_atomic(path, gzip.compress(text.encode("utf-8"), mtime=0))


def read_completions(path: Union[str, Path]) -> list[dict]:
    """The rows :func:`write_completions` wrote."""
    return [json.loads(line) for line in gzip.decompress(Path(path).read_bytes()).decode("utf-8").splitlines()]


def read_summary(path: Union[str, Path]) -> dict:
    """A ``summary.json`` of any format as the format-2 dict (``run`` with :class:`RunFacts`'s keys)."""
    data = json.loads(Path(path).read_text())
    if data.get("format") != SUMMARY_FORMAT:
        data = {"format": SUMMARY_FORMAT, "run": _run_from_format_1(data["run"]), "accuracy": data["accuracy"],
                "retention": data.get("retention"), "parameter_metrics": data["parameter_metrics"]}
    data["run"]["method"] = canonical_name(data["run"]["method"])
    return data


def run_facts(summary: Mapping) -> RunFacts:
    """The typed ``run`` part of a summary read by :func:`read_summary`."""
    known = {f.name for f in fields(RunFacts)}
    return RunFacts(**{k: v for k, v in summary["run"].items() if k in known})


# format 1: display labels → RunFacts keys; values were partly strings
_FORMAT_1_KEYS = {
    "task": "task", "model": "model", "device": "device", "steps": "steps", "learning rate": "learning_rate",
    "rank": "rank", "top-k": "top_k", "metrics k": "metrics_k", "num generations": "num_generations",
    "prompts per step": "prompts_per_step", "max completion length": "max_completion_length",
    "temperature": "temperature", "seed": "seed", "train seconds": "train_seconds", "wall seconds": "wall_seconds",
    "peak memory MB": "peak_memory_mb", "trainable params": "trainable_params",
    "reward_first_fifth": "reward_first_fifth", "reward_last_fifth": "reward_last_fifth",
    "base_model": "base_model", "base_fingerprint": "base_fingerprint", "precision": "precision",
    "precision reason": "precision_reason",
}
_MACHINE_KEYS = ("platform", "processor", "cpu_count", "torch_threads", "cpu_capability", "cpu_native_bf16", "gpu")


def _number(value: Any) -> Any:
    if isinstance(value, str):
        for kind in (int, float):
            try:
                return kind(value)
            except ValueError:
                pass
        return {"True": True, "False": False, "None": None}.get(value, value)
    return value


def _run_from_format_1(run: Mapping) -> dict:
    """The ``run`` part of a format-1 summary (label keys, ``"method": "name — description"``) in format 2."""
    out = {new: _number(run[old]) for old, new in _FORMAT_1_KEYS.items() if old in run}
    out["method"] = str(run["method"]).split(" — ")[0]
    if out.get("rank") == "n/a":
        out["rank"] = None
    out.setdefault("base_model", None)
    out.setdefault("base_fingerprint", None)
    if "precision" not in out:
        out["precision"] = "bf16" if _number(run.get("bf16")) is True else "fp32"
        out.setdefault("precision_reason", None)
    start_end = str(run.get("load average at start / end", "")).split(" / ")
    if len(start_end) == 2:
        out["load_average_start"], out["load_average_end"] = (_number(v) for v in start_end)
    out["machine"] = {key: _number(run[key]) for key in _MACHINE_KEYS if key in run}
    return out
