"""The typed settings of a run: :class:`EvalSpec` (what a held-out evaluation needs) and :class:`TrainSpec` (the
whole ``offprincipal train`` job). Both are frozen and built once, by the runner's entry points, from the parsed
command line (:mod:`offprincipal.cli` documents every option); everything below the entry points receives a spec,
never an ``argparse.Namespace``, so a misspelt setting fails where the spec is built, not deep inside a run.
The run record (:class:`~offprincipal.experiment.records.RunFacts`) takes its settings from the spec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .hardware import Precision


@dataclass(frozen=True)
class EvalSpec:
    """Greedy held-out evaluation: on ``device``, with bf16 autocast where ``precision`` says so, on the first
    ``eval_n`` test prompts of the task, each answer at most ``max_completion_length`` tokens."""

    device: str
    precision: Precision
    eval_n: int
    max_completion_length: int

    @property
    def bf16(self) -> bool:
        return self.precision.bf16


@dataclass(frozen=True)
class TrainSpec(EvalSpec):
    """One ``offprincipal train`` run, every default resolved: the method's canonical name and learning rate,
    ``metrics_k`` (the report's k; ``top_k`` unless given), the device and the precision."""

    method: str
    task: str
    model: Optional[str]
    steps: int
    lr: float
    rank: int
    top_k: int
    metrics_k: int
    num_generations: int
    prompts_per_step: int
    temperature: float
    eval_before: bool
    eval_every: int
    retention: bool
    retention_n: int
    seed: int
    output: Optional[str]
