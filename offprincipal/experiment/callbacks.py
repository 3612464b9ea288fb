"""The Trainer callbacks of an ``offprincipal train`` run: the method's own (diagnostics, masks, the projected
optimizer), periodic held-out accuracy, and the progress writer (a tqdm bar, one console line per step, and
``metrics.jsonl`` written as it goes)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm
from transformers import TrainerCallback

from ..files import to_json
from ..trainer import PeriodicLogsCallback
from .methods import get_method
from .spec import TrainSpec


class HeldOutAccuracy(PeriodicLogsCallback):
    """Greedy held-out accuracy every ``log_every`` steps, logged as ``eval/accuracy``."""

    def __init__(self, log_every: int, evaluate: Callable):
        super().__init__(log_every)
        self.evaluate = evaluate

    def diagnostics(self, model):
        return {"eval/accuracy": self.evaluate(model)}


class Progress(TrainerCallback):
    """A tqdm bar over steps, one console line per logged step, and ``metrics_path`` (JSONL) written as it goes."""

    def __init__(self, metrics_path: Path, label: str):
        self.metrics_path, self.label = metrics_path, label
        self.records: list[dict] = []
        self.bar = None
        self.step_start = self.step_seconds = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=f"train ({self.label})", unit="step")

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.step_seconds = time.perf_counter() - self.step_start

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "train_runtime" in logs:  # the Trainer's end-of-training summary, not a step
            return
        # GRPO logs its own step_time (generation included); SFT does not
        record = {"step": state.global_step, "step_time": self.step_seconds, **logs}
        self.records.append(record)
        with open(self.metrics_path, "a") as handle:
            handle.write(to_json(record) + "\n")
        self.bar.update(state.global_step - self.bar.n)
        self.bar.write(f"step {state.global_step}/{state.max_steps}  {progress_fields(record)}")

    def on_train_end(self, args, state, control, **kwargs):
        self.bar.close()


def progress_fields(record: dict) -> str:
    """The console line of one logged step."""
    fields = [
        ("reward", "reward", "{:.3f}"), ("loss", "loss", "{:.4f}"), ("eval/accuracy", "held-out acc", "{:.1%}"),
        ("completions/mean_length", "length", "{:.1f}"), ("step_time", "step time", "{:.1f} s"),
        ("offprincipal/leak_max", "leak", "{:.1e}"), ("offprincipal/principal_shift_max", "principal shift", "{:.1e}"),
    ]
    if "reward" in record:
        fields.pop(1)  # GRPO's loss is not informative next to the reward
    return "  ".join(f"{label} {fmt.format(record[key])}" for key, label, fmt in fields if key in record)


def build_callbacks(spec: TrainSpec, metrics_path: Path, evaluate: Callable) -> list:
    """The method's callback (``Method.callback``: OffPrincipal diagnostics for the adapters, the projected optimizer
    or a sparse mask for full training, GeoRA's initialisation), periodic held-out accuracy when ``spec.eval_every``,
    and :class:`Progress` last (it sees what the others add to each log)."""
    method = get_method(spec.method)
    callbacks = [] if method.callback is None else [method.callback(spec.top_k)]
    if spec.eval_every and spec.eval_n:
        callbacks.append(HeldOutAccuracy(spec.eval_every, evaluate))
    return callbacks + [Progress(metrics_path, method.name)]
