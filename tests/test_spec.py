"""The typed run settings (issue 19): a frozen TrainSpec/EvalSpec is what the experiment layer receives; argparse's
Namespace stops at the command line and the runner's entry points."""

import ast
import dataclasses
from pathlib import Path

import pytest

import offprincipal
from offprincipal.experiment.spec import EvalSpec, TrainSpec
from offprincipal.experiment.hardware import Precision

PACKAGE = Path(offprincipal.__file__).parent
ENTRY_POINTS = {"train", "evaluate", "analyze", "demo"}  # offprincipal.experiment.runner: one per CLI command


def spec(**changes) -> TrainSpec:
    fields = dict(device="cpu", precision=Precision(False, "test"), eval_n=4, max_completion_length=8,
                  method="offprincipal", task="arithmetic", model=None, steps=1, lr=1e-4, rank=2, top_k=2,
                  metrics_k=2, num_generations=2, prompts_per_step=1, temperature=0.7, eval_before=True,
                  eval_every=0, retention=False, retention_n=1, seed=0, output=None)
    return TrainSpec(**{**fields, **changes})


def test_spec_is_frozen_and_complete():
    s = spec()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.steps = 2
    with pytest.raises(TypeError, match="stpes"):
        spec(stpes=2)  # a misspelt setting fails where the spec is built
    assert isinstance(s, EvalSpec) and s.bf16 is False


def test_no_namespace_below_the_entry_points():
    """No function of the experiment layer other than the runner's entry points takes the parsed options (a
    parameter named ``args``; Trainer callbacks' ``args`` is TrainingArguments and is allowed by the ``on_*`` name).
    The library below it never saw them (its ``args`` are torch hook arguments and TrainingArguments)."""
    offenders = []
    for path in (PACKAGE / "experiment").rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            params = [a.arg for a in node.args.posonlyargs + node.args.args + node.args.kwonlyargs]
            if "args" not in params or node.name.startswith("on_"):
                continue
            if rel == "experiment/runner.py" and node.name in ENTRY_POINTS:
                continue
            offenders.append(f"{rel}:{node.lineno} {node.name}")
    assert not offenders, offenders
