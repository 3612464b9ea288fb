"""Fault injection for the command line and the model store (issue 9, findings 2, 12, 15, 16).

Each test reproduces one finding of the field report: it failed on the code before the fix and passes after it.
- 2: ``load_model`` replaced a user's own folder under ``OFFPRINCIPAL_MODEL_DIR`` with its conversion.
- 12: ``evaluate RUN`` put a run's adapter on the embedded model instead of the run's base, and evaluated a wrong
  ``--base`` of the same shape silently.
- 15: Ctrl-C printed a traceback; SIGTERM/SIGKILL left hidden temporary run folders forever; a failed run without
  ``--output`` left an empty ``runs/``.
- 16: bf16 autocast by default on a CPU that has no native bf16 (there, 20-40× slower than fp32).

Issue 17, findings 7, 8, 10 (temporary folders claimed with a lock) and 9 (a cache on a full disk) are at the end.
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


# --- issue 17, findings 7, 8, 10: temporary run folders are claimed with a lock, not a pid guess ----------------

import logging  # noqa: E402
import signal  # noqa: E402

from offprincipal import files  # noqa: E402

# A writer that holds atomic_dir(target) open until its stdin closes. With a second argument it rewrites the pid in
# its owner file to that number (keeping the file and its lock): what a writer in another PID namespace looks like
# from here, whose pid means nothing (or another process) in ours.
WRITER = """
import json, sys
from offprincipal.files import atomic_dir, OWNER_FILE
with atomic_dir(sys.argv[1]) as tmp:
    if len(sys.argv) > 2:
        with open(tmp / OWNER_FILE, "r+") as handle:
            record = json.load(handle)
            record["pid"] = int(sys.argv[2])
            handle.seek(0); handle.truncate(); handle.write(json.dumps(record)); handle.flush()
    (tmp / "out.txt").write_text("first writer")
    print(tmp, flush=True)
    sys.stdin.readline()
"""


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


class Writer:
    """A live writer process into ``target`` (see WRITER); ``.tmp`` is its temporary folder."""

    def __init__(self, target: Path, fake_pid: int | None = None):
        args = [sys.executable, "-c", WRITER, str(target)] + ([str(fake_pid)] if fake_pid is not None else [])
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.tmp = Path(self.proc.stdout.readline().strip())
        assert self.tmp.is_dir(), self.proc.communicate(timeout=60)

    def finish(self) -> int:
        self.proc.communicate("\n", timeout=60)
        return self.proc.returncode

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)


def test_second_writer_is_refused_before_its_work_starts(tmp_path):
    """Finding 8, one PID namespace: the second writer did all its work, then died at the rename (ENOTEMPTY) or
    took the target first. Now it is refused on entry, and the first writer's folder is untouched."""
    target = tmp_path / "runs" / "x"
    first = Writer(target)
    body_ran = False
    with pytest.raises(files.FolderBusyError, match=r"runs/x is being written by another process \(pid \d+ on host "):
        with files.atomic_dir(target):
            body_ran = True
    assert not body_ran and (first.tmp / "out.txt").read_text() == "first writer"
    assert first.finish() == 0
    assert (target / "out.txt").read_text() == "first writer" and sorted(p.name for p in target.iterdir()) == ["out.txt"]
    assert temp_folders(target.parent) == []


def test_writer_of_another_pid_namespace_is_never_swept(tmp_path):
    """Finding 8, a container sharing the volume: its pid does not exist here, so a pid check said "dead" and
    deleted its live folder. Liveness is its lock: the folder is kept, a writer to the same target is refused."""
    target = tmp_path / "runs" / "x"
    first = Writer(target, fake_pid=dead_pid())
    with files.atomic_dir(tmp_path / "runs" / "other") as tmp:  # any run in the same parent sweeps
        (tmp / "y").write_text("y")
    assert (first.tmp / "out.txt").read_text() == "first writer"
    with pytest.raises(files.FolderBusyError, match="being written by another process"):
        with files.atomic_dir(target):
            pass
    assert (first.tmp / "out.txt").read_text() == "first writer"
    assert first.finish() == 0 and (target / "out.txt").read_text() == "first writer"


def test_second_train_into_the_same_output_is_refused(tiny_dir, digits, tmp_path, capsys):  # noqa: F811
    target = tmp_path / "runs" / "x"
    first = Writer(target)
    assert main(tiny_args(tiny_dir, target)) == 2
    err = capsys.readouterr().err
    assert f"--output {target}: is being written by another process" in err and "Traceback" not in err
    assert first.finish() == 0 and (target / "out.txt").read_text() == "first writer"


def test_target_that_appears_during_the_write_keeps_the_output(tmp_path):
    """Finding 8's class: a folder made at the target while we wrote (by anyone) is neither replaced nor merged,
    and our finished output is not deleted: it stays at its temporary name, which the error names."""
    target = tmp_path / "x"
    with pytest.raises(FileExistsError, match=r"appeared while it was being written; the complete output is kept in") as info:
        with files.atomic_dir(target) as tmp:
            (tmp / "result.txt").write_text("ours")
            target.mkdir()  # an empty folder: os.rename would silently replace it
    assert list(target.iterdir()) == []
    kept = Path(str(info.value).split("kept in ", 1)[1].split(";")[0])
    assert (kept / "result.txt").read_text() == "ours" and not (kept / files.OWNER_FILE).exists()
    with files.atomic_dir(tmp_path / "later"):  # a later sweep leaves it: it is no longer claimed by anyone
        pass
    assert (kept / "result.txt").read_text() == "ours"


def test_abandoned_temps_of_any_run_are_removed_by_a_later_run(tiny_dir, digits, tmp_path):  # noqa: F811
    """Finding 7: a SIGKILLed run's folder was removed only by a run with the same target name, so runs into the
    default timestamped folders never cleaned up. Now any later run in the same parent removes it, and nothing else."""
    runs = tmp_path / "runs"
    killed = Writer(runs / "offprincipal-digits-20260101-000000")
    killed.kill()
    killed_same = Writer(runs / "offprincipal-digits-20260101-000002")  # the very target of the next run
    killed_same.kill()
    live = Writer(runs / "offprincipal-digits-20260101-000001", fake_pid=dead_pid())
    other_host = runs / ".y.tmp-otherhost"  # a writer on another machine sharing the folder: its lock may not reach us
    other_host.mkdir()
    (other_host / files.OWNER_FILE).write_text(json.dumps({**json.loads((live.tmp / files.OWNER_FILE).read_text()),
                                                           "host": "some-other-host"}))
    users = runs / ".z.tmp-users"  # no owner file: not ours
    users.mkdir()
    assert main(tiny_args(tmp_path / "missing-model", runs / "offprincipal-digits-20260101-000002")) == 2
    assert not killed.tmp.exists() and not killed_same.tmp.exists()
    assert sorted(p.name for p in temp_folders(runs)) == sorted([live.tmp.name, other_host.name, users.name])
    assert live.finish() == 0


@pytest.mark.parametrize("owner", [
    '{"by": "offprincipal", "format": 2, "host": "%s", "pid": 1099511627776}',  # 2**40: os.kill overflowed
    '{"by": "offprincipal", "format": 2, "host": "%s", "pid": 1e400}',  # inf: int() overflowed
    '{"host": "%s", "pid": "12"}', '{"host": "%s"}', '["%s", 1]', "%s \x00\xff", "",
])
def test_malformed_owner_file_is_kept_with_a_warning(tmp_path, owner, caplog):
    """Finding 10: an owner file naming pid 2**40 or 1e400 raised OverflowError from every later run. A malformed
    (or older, lockless) owner file proves nothing: the folder is kept, with one warning naming it."""
    bad = tmp_path / ".x.tmp-bad"
    bad.mkdir()
    (bad / files.OWNER_FILE).write_text(owner.replace("%s", os.uname().nodename) if "%s" in owner else owner)
    with caplog.at_level(logging.WARNING, logger="offprincipal.files"):
        with files.atomic_dir(tmp_path / "x") as tmp:
            (tmp / "ok").write_text("ok")
    assert (tmp_path / "x" / "ok").read_text() == "ok" and bad.is_dir()
    assert any(str(bad) in r.getMessage() and "left in place" in r.getMessage() for r in caplog.records), caplog.text


# --- issue 17, finding 9: `offprincipal train` with its caches on a full disk ---------------------------------


def test_train_with_its_caches_on_a_full_disk_runs_uncached(tiny_dir, digits, tmp_path, monkeypatch, caplog):  # noqa: F811
    """Every cache write fails as on a full disk (the bases' safetensors writer with SafetensorError, the base
    answers' JSON with OSError ENOSPC). Before: the run died with SafetensorError. Now: one warning per cache and
    a complete run."""
    import errno

    from safetensors import SafetensorError

    from offprincipal import subspace
    from offprincipal.experiment import retention

    def full_safetensors(tensors, filename, metadata=None):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                              'left on device" })')

    def full_text(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(subspace, "save_file", full_safetensors)
    monkeypatch.setattr(retention, "write_text_atomic", full_text)
    with caplog.at_level(logging.WARNING):
        assert main(tiny_args(tiny_dir, tmp_path / "run", steps=1, **{"--eval-every": None})) == 0
    assert (tmp_path / "run" / "summary.json").is_file()
    warned = sorted(r.getMessage().split(" ", 2)[0] + " " + r.getMessage().split(" ", 2)[1]
                    for r in caplog.records if "cannot be written" in r.getMessage())
    assert warned == ["retention cache", "subspace cache"], caplog.text


# --- issue 17, finding 11: a lone surrogate stops `offprincipal train` at load, not in the tokenizer ------------


def test_train_refuses_a_lone_surrogate_before_loading_the_model(tmp_path, monkeypatch, capsys):
    rows = [f'{{"prompt": "q{i}?", "answer": {i}}}' for i in range(6)] + [r'{"prompt": "bad \ud800 one", "answer": 1}']
    task = tmp_path / "mine.jsonl"
    task.write_text("\n".join(rows) + "\n")
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--task", str(task), "--model", str(tmp_path / "never-loaded"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"{task}:7: a lone surrogate \\ud800 in 'prompt'" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_atomic_file_is_the_old_file_or_the_whole_new_one_and_leaves_no_temp(tmp_path):
    """files.atomic_file, the one home of atomic file writes (the subspace cache, save_as_lora, the reports and
    write_*_atomic write through it): a writer that fails leaves the old file as it was and no temporary file; one
    that succeeds replaces it whole; a caller's prefix names the temporary file."""
    target = tmp_path / "out" / "f.bin"
    files.write_bytes_atomic(target, b"old")
    seen = []
    with pytest.raises(RuntimeError, match="disk gone"):
        with files.atomic_file(target) as tmp:
            seen.append(tmp.name)
            tmp.write_bytes(b"half")
            raise RuntimeError("disk gone")
    assert target.read_bytes() == b"old" and sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]
    assert seen[0].startswith(".f.bin.tmp-")
    with files.atomic_file(target, prefix=".mine-") as tmp:
        assert tmp.name.startswith(".mine-") and tmp.parent == target.parent
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # readers see the old file until the block ends
    assert target.read_bytes() == b"new" and sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]
