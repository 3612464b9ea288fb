"""The command line: `offprincipal train` for every method, `analyze`, bad input, atomic run folders, `demo`.

Tiny runs go through the Python entry point ``offprincipal.cli.main([...])`` on a tiny Llama saved to disk. The
arithmetic task gives a random tiny model reward 0 everywhere (so no gradient), so those runs use a task registered
here whose reward (the fraction of digits in a completion) varies inside a group.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
import torch
from safetensors.torch import load_file

from offprincipal import principal_leak, top_k_subspace
from offprincipal.cli import main
from offprincipal.metrics import linear_weights
from offprincipal.experiment.records import read_completions
from offprincipal.experiment.tasks import TASKS, ArithmeticTask
from conftest import make_tiny_model, make_tokenizer

pytest.importorskip("trl")

TOP_K = 8
PNGS = {"training_curve.png", "accuracy.png", "nss.png", "principal_angles.png", "sparsity.png", "mask_overlap.png"}


def digit_reward(completions, **kwargs):
    """Fraction of digits in each completion: varies within a group, so GRPO gets a gradient on a random model."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [sum(ch.isdigit() for ch in t) / max(1, len(t)) for t in texts]


@dataclass(frozen=True)
class DigitTask(ArithmeticTask):
    n_train: int = 64
    n_test: int = 8
    name: str = "digits"

    @property
    def reward_funcs(self):
        return [digit_reward]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "llama"
    make_tiny_model("llama").save_pretrained(path)
    make_tokenizer().save_pretrained(path)
    return path


def tiny_args(model_dir, output, method="offprincipal", steps=2, **overrides):
    options = {
        "--method": method, "--model": model_dir, "--task": "digits", "--steps": steps, "--num-generations": 4,
        "--max-completion-length": 6, "--eval-n": 4, "--retention-n": 3, "--top-k": TOP_K, "--rank": 4, "--device": "cpu",
        "--lr": 1e-2 if method in ("offprincipal", "lora") else 1e-3, "--eval-every": 2, "--output": output, **overrides,
    }
    return ["train", "--no-bf16"] + [str(x) for kv in options.items() for x in kv if kv[1] is not None]


@pytest.fixture
def digits(monkeypatch):
    """Registers the digits task for the CLI (its --task choices are read from TASKS)."""
    monkeypatch.setitem(TASKS, "digits", DigitTask)


@pytest.fixture(scope="module")
def run(tiny_dir, tmp_path_factory):
    """``run(method)`` → the folder of a 2-step tiny run of that method (trained once per module)."""
    folders = {}

    def get(method):
        if method not in folders:
            out = tmp_path_factory.mktemp("runs") / method
            with pytest.MonkeyPatch.context() as mp:
                mp.setitem(TASKS, "digits", DigitTask)
                mp.setenv("OFFPRINCIPAL_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
                assert main(tiny_args(tiny_dir, out, method)) == 0
            folders[method] = out
        return folders[method]

    return get


def strict_json(text):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def assert_complete_run(folder: Path, weights: str, steps: int = 2, reward: bool = True, layers: int = 14,
                        eval_n: int = 4, retention_n: Optional[int] = 3):
    """The run folder has everything train promises, and no scratch or temporary folder is left."""
    records = [strict_json(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert all(("reward" in r) == reward and "loss" in r and "step_time" in r for r in records)
    assert ["eval/accuracy" in r for r in records] == [step % 2 == 0 for step in range(1, steps + 1)]  # --eval-every 2
    summary = strict_json((folder / "summary.json").read_text())
    assert set(summary) == {"format", "run", "accuracy", "retention", "parameter_metrics"} and summary["format"] == 2
    assert all(key.isidentifier() for part in ("run", "accuracy", "parameter_metrics") for key in summary[part])
    assert all(key.isidentifier() for key in summary["run"]["machine"])
    assert summary["run"]["precision"] in ("fp32", "bf16") and isinstance(summary["run"]["steps"], int)
    accuracy = summary["accuracy"]
    assert all(0.0 <= accuracy[when] <= 1.0 for when in ("before", "after"))
    assert accuracy["after_ci95_low"] <= accuracy["after"] <= accuracy["after_ci95_high"] and accuracy["after_n"] == eval_n
    assert accuracy["gain"] == pytest.approx(accuracy["after"] - accuracy["before"])
    for when in ("before", "after"):  # per-prompt outcomes (0/1, prompt order) and the strict score beside them
        lenient, strict = accuracy[f"{when}_correct"], accuracy[f"{when}_strict_correct"]
        assert len(lenient) == len(strict) == eval_n and set(lenient) | set(strict) <= {0, 1}
        assert sum(lenient) / eval_n == pytest.approx(accuracy[when]) and sum(strict) / eval_n == pytest.approx(accuracy[f"strict_{when}"])
        assert all(s <= c for s, c in zip(strict, lenient))  # strict never counts what the lenient score does not
    completions = read_completions(folder / accuracy["completions_file"])
    assert [row["correct"] for row in completions] == accuracy["after_correct"]
    assert [row["strict"] for row in completions] == accuracy["after_strict_correct"] and all(
        isinstance(row["completion"], str) and row["question"] for row in completions)
    assert accuracy["after_lenient_strict_disagree"] == pytest.approx(
        sum(a != b for a, b in zip(accuracy["after_correct"], accuracy["after_strict_correct"])) / eval_n)
    assert len((folder / "layers.jsonl").read_text().splitlines()) == layers == summary["parameter_metrics"]["layers"]
    report = (folder / "report.md").read_text()
    retention = summary["retention"]
    if retention_n is None:  # --no-retention
        assert retention is None and "Retention" not in report
    else:
        assert retention["prompts"] >= 64 and retention["answer_tokens"] > 0 and retention["task"] == "capitals"
        assert retention["nll_drift_nats_per_token"] == pytest.approx(
            retention["tuned_nll_nats_per_token"] - retention["base_nll_nats_per_token"])
        assert retention["kl_to_base_nats_per_token"] >= 0.0 and retention["kl_top_m"] == 64
        assert f"**{retention['kl_to_base_nats_per_token']:.4f}** nats/token" in report
        assert retention["task_accuracy"]["after_n"] == retention_n and retention["task_accuracy"]["before"] is not None
        assert "## Retention" in report
    assert {p.name for p in (folder / "plots").iterdir()} == PNGS
    for png in PNGS:
        assert f"plots/{png}" in report
        assert (folder / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    files = {p.name for p in (folder / weights).iterdir()}
    expected = {"adapter_model.safetensors", "adapter_config.json"} if weights == "adapter" else {"model.safetensors", "config.json"}
    assert expected <= files
    assert not (folder / "trainer").exists()
    assert not [p for p in folder.parent.iterdir() if ".tmp-" in p.name]
    return records, summary


def layer_records(folder: Path) -> list[dict]:
    return [strict_json(line) for line in (folder / "layers.jsonl").read_text().splitlines()]


def test_train_offprincipal_adapter(run, tiny_dir):
    from peft import PeftModel

    folder = run("offprincipal")
    records, summary = assert_complete_run(folder, "adapter")
    assert all(r["offprincipal/leak_max"] <= 1e-5 for r in records)
    trained = load_file(folder / "adapter" / "adapter_model.safetensors")
    assert any("offprincipal_B" in name and t.abs().max() > 0 for name, t in trained.items())  # B starts at 0

    base = make_tiny_model("llama")
    model = PeftModel.from_pretrained(make_tiny_model("llama"), str(folder / "adapter"))
    for name, weight in linear_weights(base).items():  # the base weights under the adapter are untouched
        assert torch.equal(model.get_submodule(f"base_model.model.{name}").get_base_layer().weight, weight)
    merged = linear_weights(model.merge_and_unload())
    for name, weight in linear_weights(base).items():
        subspace = top_k_subspace(weight, TOP_K)
        assert max(principal_leak((merged[name] - weight).double(), subspace.U, subspace.V)) <= 1e-5, name
    assert sum(r["update_sparsity"] < 1 for r in layer_records(folder)) == 14
    assert summary["parameter_metrics"]["mean_leak_left"] <= 1e-5


def test_train_offprincipal_random(run):
    folder = run("offprincipal-random")
    records, summary = assert_complete_run(folder, "adapter")
    assert all(r["offprincipal/leak_max"] <= 1e-5 for r in records)  # off its own (random) subspace
    config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert config["basis"] == "random" and config["basis_seed"] == summary["run"]["seed"]


def test_train_offprincipal_full(run):
    folder = run("offprincipal-full")
    records, _ = assert_complete_run(folder, "model")
    assert all(r["offprincipal/principal_shift_max"] <= 1e-5 for r in records)
    base = linear_weights(make_tiny_model("llama"))
    tuned = load_file(folder / "model" / "model.safetensors")
    for name, weight in base.items():
        delta = (tuned[f"{name}.weight"] - weight).double()
        assert delta.abs().max() > 0, f"{name} did not train"
        subspace = top_k_subspace(weight, TOP_K)
        assert max(principal_leak(delta, subspace.U, subspace.V)) <= 1e-5, name


@pytest.mark.parametrize("method,weights", [
    ("lora", "adapter"), ("dora", "adapter"), ("pissa", "model"), ("mica", "adapter"), ("osf", "adapter"),
    ("full", "model"), ("sparse-safe", "model"), ("offprincipal-random", "adapter"), ("geora", "model"),
])
def test_train_baselines(run, method, weights):
    folder = run(method)
    _, summary = assert_complete_run(folder, weights)
    assert all(r["update_sparsity"] < 1 for r in layer_records(folder))
    if method != "osf":  # OSF keeps the top-k singular directions frozen: its update is off-principal too
        # (offprincipal-random keeps off its random subspace, not the top-k: it leaks into the top-k like LoRA)
        assert max(max(r["leak_left"], r["leak_right"]) for r in layer_records(folder)) > 1e-3
    assert 0 < summary["run"]["trainable_params"] and summary["run"]["peak_memory_mb"] > 0


@pytest.mark.parametrize("kind", ["principal", "safe", "random"])
def test_train_sparse_masks(run, tiny_dir, kind):
    """Entries outside the fixed mask keep their base value bit for bit; the mask has the documented density."""
    from offprincipal.experiment.sparse import mask_density, sparse_masks

    folder = run(f"sparse-{kind}")
    _, summary = assert_complete_run(folder, "model")
    base = linear_weights(make_tiny_model("llama"))
    masks = sparse_masks(base, kind, TOP_K, progress=False)
    tuned = load_file(folder / "model" / "model.safetensors")
    for name, weight in base.items():
        changed = tuned[f"{name}.weight"] != weight
        assert changed.any(), f"{name} did not train"
        assert not (changed & ~masks[name]).any(), f"{name}: a masked entry moved"
    density = mask_density(masks)
    assert density == pytest.approx(0.5, abs=1e-3) if kind == "principal" else 0.6 < density < 0.9
    full = sum(p.numel() for p in make_tiny_model("llama").parameters())
    masked_out = sum(int((~m).sum()) for m in masks.values())
    assert summary["run"]["trainable_params"] == full - masked_out


def test_train_sft(run):
    folder = run("sft")
    assert_complete_run(folder, "model", reward=False)
    assert all(r["update_sparsity"] < 1 for r in layer_records(folder))


def test_evaluate_model_and_adapter_run(run, tiny_dir, digits, capsys):
    """`evaluate` gives the accuracy `train` reported after training (same prompts, greedy), from the run folder's
    adapter merged onto --base, and the base model's own accuracy."""
    folder = run("offprincipal")
    summary = strict_json((folder / "summary.json").read_text())
    common = ["--task", "digits", "--eval-n", "4", "--max-completion-length", "6", "--no-bf16", "--device", "cpu", "--json"]
    assert main(["evaluate", str(folder), "--base", str(tiny_dir), *common]) == 0
    tuned = strict_json(capsys.readouterr().out.strip().splitlines()[-1])
    assert tuned["accuracy"] == summary["accuracy"]["after"] and tuned["eval_n"] == 4
    assert main(["evaluate", str(tiny_dir), *common]) == 0
    assert strict_json(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] == summary["accuracy"]["before"]
    assert main(["evaluate", str(folder / "missing"), *common]) == 2
    assert "not found" in capsys.readouterr().err


def test_analyze_two_checkpoints(tiny_dir, tmp_path):
    tuned = make_tiny_model("llama")
    with torch.no_grad():
        tuned.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    tuned.save_pretrained(tmp_path / "tuned")
    make_tokenizer().save_pretrained(tmp_path / "tuned")
    out = tmp_path / "analysis"
    assert main(["analyze", str(tiny_dir), str(tmp_path / "tuned"), "--top-k", "4", "--output", str(out)]) == 0
    records = {r["name"]: r for r in layer_records(out)}
    assert len(records) == 14 and all(r["k"] == 4 for r in records.values())
    changed = records["model.layers.1.mlp.down_proj"]
    assert changed["nss"] == pytest.approx(0.5, rel=1e-6) and changed["update_sparsity"] < 0.01
    assert all(r["nss"] == 0 and r["update_sparsity"] == 1 for n, r in records.items() if n != changed["name"])
    assert {p.name for p in (out / "plots").iterdir()} == {"nss.png", "principal_angles.png", "sparsity.png", "mask_overlap.png"}
    assert "| down_proj |" in (out / "report.md").read_text()
    assert strict_json((out / "summary.json").read_text())["parameter_metrics"]["layers"] == 14


def test_analyze_merges_an_adapter_of_a_run(run, tiny_dir, tmp_path):
    folder = run("offprincipal")
    out = tmp_path / "analysis"
    assert main(["analyze", str(tiny_dir), str(folder), "--top-k", str(TOP_K), "--output", str(out)]) == 0
    assert [r["nss"] for r in layer_records(out)] == pytest.approx([r["nss"] for r in layer_records(folder)])
    assert max(max(r["leak_left"], r["leak_right"]) for r in layer_records(out)) <= 1e-5


# --- bad input ----------------------------------------------------------------------------------------------------


def assert_user_error(capsys, argv, *needles):
    """Exit status 2 and a last stderr line ``offprincipal <cmd>: error: ...`` naming the argument."""
    assert main(argv) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"offprincipal {argv[0]}: error: "), last
    for needle in needles:
        assert needle in last, last


def no_run_folder(path: Path) -> bool:
    return not path.exists() and not [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.tmp-")]


@pytest.mark.parametrize(
    "overrides,needles",
    [
        ({"--method": "qlora"}, ("--method", "qlora", "offprincipal", "sparse-safe")),
        ({"--task": "chess"}, ("--task", "chess", "arithmetic")),
        ({"--model": "/nonexistent/model"}, ("--model", "/nonexistent/model")),
        ({"--top-k": 24}, ("--top-k 24", "k_proj", "< 24")),  # k_proj is 24×48
        ({"--steps": 0}, ("--steps", "positive")),
    ],
)
def test_train_bad_input(tiny_dir, digits, tmp_path, capsys, overrides, needles):
    out = tmp_path / "run"
    assert_user_error(capsys, tiny_args(tiny_dir, out, **overrides), *needles)
    assert no_run_folder(out)


def test_train_unwritable_or_existing_output(tiny_dir, digits, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert_user_error(capsys, tiny_args(tiny_dir, blocker / "run"), "--output", "writable")
    existing = tmp_path / "done"
    existing.mkdir()
    assert_user_error(capsys, tiny_args(tiny_dir, existing), "--output", "already exists")
    assert list(existing.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_train_cuda_without_gpu(tiny_dir, digits, tmp_path, capsys):
    assert_user_error(capsys, tiny_args(tiny_dir, tmp_path / "run", **{"--device": "cuda"}), "--device cuda", "--device cpu")
    assert no_run_folder(tmp_path / "run")


def test_failing_run_leaves_no_folder(tiny_dir, digits, tmp_path, monkeypatch):
    import offprincipal.experiment.report

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(offprincipal.experiment.report, "write_train_report", broken)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="disk full"):
        main(tiny_args(tiny_dir, out, steps=1))
    assert no_run_folder(out)


def test_analyze_bad_input(tiny_dir, tmp_path, capsys):
    assert_user_error(capsys, ["analyze", str(tiny_dir), str(tmp_path / "missing"), "--output", str(tmp_path / "a")],
                      "TUNED", "not found")
    assert_user_error(capsys, ["analyze", str(tmp_path / "nope"), str(tiny_dir), "--output", str(tmp_path / "a")],
                      "BASE")
    other = tmp_path / "gpt2"
    make_tiny_model("gpt2").save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    assert_user_error(capsys, ["analyze", str(tiny_dir), str(other), "--top-k", "4", "--output", str(tmp_path / "a")],
                      "TUNED", "does not match BASE")
    assert_user_error(capsys, ["analyze", str(tiny_dir), str(tiny_dir), "--top-k", "48", "--output", str(tmp_path / "a")],
                      "--top-k 48")
    assert_user_error(capsys, ["analyze", str(tiny_dir), str(tiny_dir), "--alpha", "1.5"], "--alpha", "(0, 1)")
    assert no_run_folder(tmp_path / "a")


def test_help_and_demo(tiny_dir, capsys):
    assert main(["train", "--help"]) == 0
    assert "--method" in capsys.readouterr().out
    args = ["demo", "--model", str(tiny_dir), "--steps", "1", "--batch", "2", "--rank", "4", "--top-k", str(TOP_K)]
    assert main(args) == 0
    leak = float(capsys.readouterr().out.rsplit("principal leak ", 1)[1])
    assert leak <= 1e-5


# --- the real model -----------------------------------------------------------------------------------------------


@pytest.mark.real_model
@pytest.mark.slow
def test_train_smoke_on_embedded_model(smollm2_dir, tmp_path):
    """One GRPO step of the default method on SmolLM2-135M-Instruct, with a complete run folder."""
    out = tmp_path / "run"
    argv = ["train", "--steps", "1", "--num-generations", "2", "--max-completion-length", "8", "--eval-n", "2",
            "--no-retention", "--device", "cpu", "--output", str(out)]  # retention on SmolLM2: test_retention.py
    assert main(argv) == 0
    records, _ = assert_complete_run(out, "adapter", steps=1, layers=210, eval_n=2, retention_n=None)
    assert records[0]["offprincipal/leak_max"] <= 1e-5


def test_train_on_a_jsonl_task_of_ones_own(tiny_dir, tmp_path, capsys):
    """`--task file.jsonl`: a user's task trains and evaluates end to end; a malformed file is refused before any
    output folder exists, with the file, the line and what is wrong."""
    task = tmp_path / "mine.jsonl"
    task.write_text("\n".join(json.dumps({"prompt": f"What is {i} plus {i}?", "answer": 2 * i}) for i in range(40)))
    out = tmp_path / "run"
    args = [a for a in tiny_args(tiny_dir, out, steps=1, **{"--task": task, "--eval-every": None})]
    assert main(args) == 0
    summary = strict_json((out / "summary.json").read_text())
    assert summary["run"]["task"] == str(task) and summary["accuracy"]["after_n"] == 4

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a?", "answer": 1}\n{"prompt": "b?"}\nnot json\n')
    capsys.readouterr()
    assert main(tiny_args(tiny_dir, tmp_path / "run-bad", **{"--task": bad})) == 2
    err = capsys.readouterr().err
    assert f"--task {bad}" in err and f"{bad}:2" in err and f"{bad}:3" in err
    assert not (tmp_path / "run-bad").exists()


def test_no_eval_before_says_why_the_retention_task_has_no_before(tiny_dir, tmp_path, digits, monkeypatch, capsys):
    """With --no-eval-before the retention task's accuracy before training is not measured: the console says so
    (it used to blame --eval-n 0) and the record keeps before = None next to the measured after."""
    monkeypatch.setenv("OFFPRINCIPAL_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(tiny_args(tiny_dir, out, steps=1, **{"--eval-every": None}) + ["--no-eval-before"]) == 0
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("retention: NLL drift"))
    assert "capitals accuracy not measured (--no-eval-before) → " in line and "--eval-n 0" not in line
    task = strict_json((out / "summary.json").read_text())["retention"]["task_accuracy"]
    assert task["before"] is None and task["after"] is not None
