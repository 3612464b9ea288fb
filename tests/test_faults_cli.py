"""Fault injection for the command line and the model store (issue 9, findings 2, 12, 15, 16).

Each test reproduces one finding of the field report: it failed on the code before the fix and passes after it.
- 2: ``load_model`` replaced a user's own folder under ``OFFPRINCIPAL_MODEL_DIR`` with its conversion.
- 12: ``evaluate RUN`` put a run's adapter on the embedded model instead of the run's base, and evaluated a wrong
  ``--base`` of the same shape silently.
- 15: Ctrl-C printed a traceback; SIGTERM/SIGKILL left hidden temporary run folders forever; a failed run without
  ``--output`` left an empty ``runs/``.
- 16: bf16 autocast by default on a CPU that has no native bf16 (there, 20-40× slower than fp32).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from offprincipal.experiment import models
from offprincipal.cli import main
from offprincipal.files import OWNER_FILE
from conftest import make_tiny_model, make_tokenizer
from test_cli import DigitTask, digits, run, tiny_args, tiny_dir  # noqa: F401 - fixtures

pytest.importorskip("trl")


def temp_folders(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".tmp-" in p.name] if parent.exists() else []


# --- finding 2: the model store never deletes or replaces a folder it did not write ------------------------------


def test_model_dir_holding_a_users_folder_is_left_untouched(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFPRINCIPAL_MODEL_DIR", str(tmp_path))
    users = tmp_path / models.DEFAULT_MODEL_NAME
    users.mkdir()
    (users / "my_notes.txt").write_text("mine")
    monkeypatch.setattr(models, "load_gguf", lambda path, dtype=None: (make_tiny_model(), make_tokenizer()))
    with pytest.raises(models.ForeignModelDirError, match="OFFPRINCIPAL_MODEL_DIR"):
        models.load_model()
    assert sorted(p.name for p in users.iterdir()) == ["my_notes.txt"]
    assert (users / "my_notes.txt").read_text() == "mine"


def test_model_store_keeps_temp_folders_it_did_not_create(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load_gguf", lambda path, dtype=None: (make_tiny_model(), make_tokenizer()))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(8))
    foreign = tmp_path / "store" / f"{models._TMP_PREFIX}M-users"
    foreign.mkdir(parents=True)
    models.convert_gguf(gguf, tmp_path / "store" / "M")
    assert foreign.is_dir()


# --- finding 12: evaluate uses the run's recorded base, and checks a given --base -------------------------------


def test_evaluate_run_uses_its_recorded_base(run, digits, capsys):  # noqa: F811
    folder = run("offprincipal")  # trained with --model <tiny llama>, not the embedded model
    summary = json.loads((folder / "summary.json").read_text())["run"]
    assert Path(summary["base_model"]).is_dir() and len(summary["base_fingerprint"]) == 32
    assert main(["evaluate", str(folder), "--task", "digits", "--eval-n", "4", "--max-completion-length", "6",
                 "--device", "cpu", "--no-bf16", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["accuracy"] == summary_accuracy_after(folder)


def summary_accuracy_after(folder: Path) -> float:
    return json.loads((folder / "summary.json").read_text())["accuracy"]["after"]


def test_evaluate_refuses_a_base_the_run_was_not_trained_on(run, digits, tmp_path, capsys):  # noqa: F811
    folder = run("offprincipal")
    other = tmp_path / "other-llama"  # same architecture and shapes, one weight slightly different
    model = make_tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(1e-3 * torch.randn_like(model.model.layers[0].mlp.down_proj.weight))
    model.save_pretrained(other)
    make_tokenizer().save_pretrained(other)
    code = main(["evaluate", str(folder), "--base", str(other), "--task", "digits", "--eval-n", "4",
                 "--max-completion-length", "6", "--device", "cpu", "--no-bf16"])
    err = capsys.readouterr().err
    assert code == 2
    assert "--base" in err and "differ from the base the run" in err and str(other) in err


# --- finding 15: interruptions ---------------------------------------------------------------------------------


def _interrupting(monkeypatch, exc):
    from offprincipal.experiment import runner

    def interrupted(args, folder, start):
        (folder / "half-written.txt").write_text("x")
        raise exc

    monkeypatch.setattr(runner, "train_into", interrupted)


def test_ctrl_c_prints_one_line_and_leaves_nothing(tiny_dir, digits, tmp_path, monkeypatch, capsys):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    _interrupting(monkeypatch, KeyboardInterrupt())
    assert main(tiny_args(tiny_dir, None)) == 130  # no --output: the default runs/<name>
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "offprincipal train: interrupted (Ctrl-C); nothing was written"
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "runs").exists()


SIGTERM_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import offprincipal.cli as cli
from offprincipal.experiment import runner
from offprincipal.experiment.tasks import TASKS
from test_cli import DigitTask, tiny_args
TASKS["digits"] = DigitTask

def killed(args, folder, start):
    (folder / "half-written.txt").write_text("x")
    os.kill(os.getpid(), signal.SIGTERM)

runner.train_into = killed
sys.exit(cli.main(tiny_args({model!r}, {output!r})))
"""


def test_sigterm_cleans_up(tiny_dir, tmp_path):  # noqa: F811
    output = tmp_path / "runs" / "x"
    script = SIGTERM_SCRIPT.format(tests=str(Path(__file__).parent), model=str(tiny_dir), output=str(output))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "offprincipal train: terminated (SIGTERM); nothing was written"
    assert not (tmp_path / "runs").exists()


def test_temp_folders_of_killed_runs_are_removed_and_no_others(tiny_dir, digits, tmp_path):  # noqa: F811
    runs = tmp_path / "runs"
    killed = runs / ".x.tmp-killed"  # what a SIGKILLed run leaves: our owner file naming a dead process
    killed.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (killed / OWNER_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid}))
    alive = runs / ".x.tmp-running"  # a run still writing (this very process)
    alive.mkdir()
    (alive / OWNER_FILE).write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid()}))
    users = runs / ".x.tmp-users"  # no owner file: not ours
    users.mkdir()
    assert main(tiny_args(tmp_path / "missing-model", runs / "x")) == 2  # fails after the sweep
    assert sorted(p.name for p in temp_folders(runs)) == [".x.tmp-running", ".x.tmp-users"]


def test_failed_run_without_output_leaves_no_runs_folder(digits, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.chdir(tmp_path)
    assert main(tiny_args(tmp_path / "missing-model", None)) == 2
    assert list(tmp_path.iterdir()) == []


# --- finding 16: the precision follows the hardware ------------------------------------------------------------


def test_precision_choice(monkeypatch):
    from offprincipal.experiment import hardware

    monkeypatch.setattr(hardware, "cpu_native_bf16", lambda: False)
    choice = hardware.choose_precision("cpu")
    assert not choice.bf16 and "no AVX512_BF16/AMX" in choice.reason
    assert hardware.choose_precision("cpu", requested=True) == hardware.Precision(True, "--bf16 given")
    monkeypatch.setattr(hardware, "cpu_native_bf16", lambda: True)
    monkeypatch.setattr(hardware, "cpu_bf16_benchmark", lambda: (0.010, 0.004))  # bf16 slower: emulated
    assert not hardware.choose_precision("cpu").bf16
    monkeypatch.setattr(hardware, "cpu_bf16_benchmark", lambda: (0.001, 0.004))
    choice = hardware.choose_precision("cpu")
    assert choice.bf16 and "1.00 ms vs fp32 4.00 ms" in choice.reason
    assert hardware.choose_precision("cpu", requested=False) == hardware.Precision(False, "--no-bf16 given")


def test_precision_is_fp32_on_an_avx2_only_cpu():
    """An AVX2-only CPU, emulated by capping torch's and oneDNN's instruction sets: bf16 is never chosen."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    code = "from offprincipal.experiment.hardware import choose_precision; c = choose_precision('cpu'); print(c.bf16, c.reason)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("False "), out.stdout


def test_train_records_the_precision_and_why(tiny_dir, digits, tmp_path, monkeypatch):  # noqa: F811
    from offprincipal.experiment import hardware

    monkeypatch.setattr(hardware, "cpu_native_bf16", lambda: False)
    args = [a for a in tiny_args(tiny_dir, tmp_path / "run", steps=1, **{"--eval-every": None}) if a != "--no-bf16"]
    assert main(args) == 0
    run_facts = json.loads((tmp_path / "run" / "summary.json").read_text())["run"]
    assert run_facts["precision"] == "fp32" and "no AVX512_BF16/AMX" in run_facts["precision_reason"]
    assert "no AVX512_BF16/AMX" in (tmp_path / "run" / "report.md").read_text()
