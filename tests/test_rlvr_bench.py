"""The RLVR benchmark harness (benchmarks/rlvr.py) on a tiny Llama: every arm runs (2 steps each, as subprocesses of
``offprincipal train``), every record is well-formed strict JSON, the sweep picks the rates, and a re-run resumes:
it skips finished runs, rebuilds a record from a finished run folder, and re-trains only what is missing."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import sys
from pathlib import Path

import pytest

from offprincipal.experiment.methods import METHODS as REGISTRY
from offprincipal.experiment.records import read_completions
from conftest import make_tiny_model, make_tokenizer

pytest.importorskip("trl")

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {
    "method", "seed", "steps", "lr", "rank", "top_k", "accuracy_before", "accuracy_after", "reward_first", "reward_last",
    "step_time_s", "peak_mem_mb", "trainable_params", "nss_mean", "max_angle_mean", "bf16_sparsity",
    "overlap_principal", "overlap_lowmag", "leak", "device", "commit", "update_rel_mean", "grad_norm_curve",
    "entropy_curve",
}
METHODS = set(REGISTRY)  # every method of the registry is an arm of the default suite


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def strict(path: Path) -> dict:
    def refuse(constant):
        raise ValueError(f"{path}: non-standard JSON constant {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """``run()`` runs the tiny suite (returns main's exit status and stdout); ``records`` reads its records."""
    tmp = tmp_path_factory.mktemp("rlvr")
    model = tmp / "tiny"
    make_tiny_model("llama").save_pretrained(model)
    make_tokenizer().save_pretrained(model)
    rlvr = load_script("rlvr")
    argv = [
        "run", "--suite", "tiny", "--results", tmp / "results", "--runs", tmp / "runs", "--model", model,
        "--steps", 2, "--eval-n", 4, "--num-generations", 4, "--max-completion-length", 6, "--rank", 4, "--top-k", 8,
        "--metrics-k", 8, "--no-bf16", "--device", "cpu", "--seeds", 2, "--single-seeds", 1, "--ablation-top-k", 2, 12,
        "--fixed-lr", "lora=1e-2",
        "--sweep", "lora=1e-3,1e-2", "offprincipal=1e-3,1e-2", "full=1e-4,1e-3",
    ]

    class Suite:
        folder = tmp / "results" / "tiny"
        runs = tmp / "runs" / "tiny"

        @staticmethod
        def run(capsys):
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("OFFPRINCIPAL_CACHE_DIR", str(tmp / "cache"))
                status = rlvr.main([str(a) for a in argv])
            return status, capsys.readouterr().out

        @classmethod
        def records(cls) -> dict[str, dict]:
            return {p.stem: strict(p) for p in sorted((cls.folder / "records").glob("*.json"))}

    return Suite


def test_every_arm_runs_and_records_are_well_formed(suite, capsys):
    status, out = suite.run(capsys)
    assert status == 0, out
    records = suite.records()
    assert {r["method"] for r in records.values()} == METHODS
    # 5 multi-seed methods × 2 seeds + 9 single-seed + 2 ablation runs + 3 sweep runs at the rate not chosen
    # + 2 seeds of LoRA at the fixed rate 1e-2
    assert len(records) == 5 * 2 + 9 + 2 + 3 + 2
    for run_id, r in records.items():
        assert FIELDS <= set(r), f"{run_id} lacks {FIELDS - set(r)}"
        assert r["run_id"] == run_id and r["steps"] == 2 and r["role"] in ("main", "sweep")
        assert 0 <= r["accuracy_before"] <= 1 and 0 <= r["accuracy_after"] <= 1
        assert r["trainable_params"] > 0 and r["peak_mem_mb"] > 0 and r["step_time_s"] > 0
        assert len(r["layer_names"]) == len(r["layer_nss"]) == len(r["layer_max_angle"]) == 14
        assert (r["reward_curve"] is None) == (r["method"] == "sft")
        assert all(isinstance(v, float) and not math.isnan(v) for v in r["loss_curve"])
        assert (r["rank"] == 4) == (r["method"] in ("offprincipal", "offprincipal-random", "lora", "dora", "pissa",
                                                    "mica", "geora"))
        # per-prompt outcomes (issue 18): after from the run, before from the suite's base evaluation; completions
        assert len(r["correct_after"]) == len(r["strict_correct_after"]) == len(r["correct_before"]) == 4
        assert sum(r["correct_after"]) / 4 == r["accuracy_after"] and sum(r["correct_before"]) / 4 == r["accuracy_before"]
        assert r.get("retention_kl") is None or r["retention_kl"] >= 0  # with --retention (not in this tiny suite)
        rows = read_completions(suite.folder / "records" / r["completions_file"])
        assert [row["correct"] for row in rows] == r["correct_after"]
        assert not list((suite.runs / run_id).glob("adapter")) and not list((suite.runs / run_id).glob("model"))
    assert len({r["accuracy_before"] for r in records.values()}) == 1  # the base model, measured once
    assert {r["arm"] for r in records.values() if r["top_k"] != 8} == {"offprincipal k=2", "offprincipal k=12"}
    selection = strict(suite.folder / "lr_selection.json")
    for method in ("lora", "offprincipal", "full"):
        chosen = selection[method]["lr"]
        roles = {r["lr"]: r["role"] for r in records.values() if r["method"] == method and r["seed"] == 0
                 and r["top_k"] == 8}
        assert roles == {lr: "main" if lr == chosen else "sweep" for lr in roles} and len(roles) == 2
        family = [r for r in records.values() if r["role"] == "main" and r["method"] in
                  {"lora": ("dora", "pissa", "mica"), "offprincipal": ("offprincipal",),
                   "full": ("offprincipal-full", "osf", "sparse-safe", "sft")}[method]]
        assert family and all(r["lr"] == chosen for r in family)
    fixed = [r for r in records.values() if r["arm"] == "lora lr=0.01"]
    assert sorted(r["seed"] for r in fixed) == [0, 1] and all(r["role"] == "main" for r in fixed)
    if selection["lora"]["lr"] != 1e-2:  # then seed 0 repeats the sweep run at 1e-2, which stays a sweep record
        twin = records["lora-k8-lr0.01-s0"]
        assert twin["role"] == "sweep" and twin["arm"] == "lora"
        assert twin["accuracy_after"] == fixed[0]["accuracy_after"] and twin["loss_curve"] == fixed[0]["loss_curve"]
    report = (suite.folder / "report.md").read_text()
    assert all(method in report for method in METHODS)


def test_rerun_resumes(suite, capsys):
    before = suite.records()
    status, out = suite.run(capsys)  # everything is done: nothing starts
    assert status == 0 and "start" not in out
    assert suite.records() == before

    # a record lost after its run folder was complete: rebuilt without training
    finished = next(run_id for run_id, r in before.items() if r["method"] == "lora" and r["seed"] == 1)
    (suite.folder / "records" / f"{finished}.json").unlink()
    # record and run folder lost: trained again, alone
    missing = next(run_id for run_id in before if run_id.startswith("sparse-random"))
    (suite.folder / "records" / f"{missing}.json").unlink()
    shutil.rmtree(suite.runs / missing)
    status, out = suite.run(capsys)
    assert status == 0, out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("start")] == [missing]
    after = suite.records()
    assert set(after) == set(before)
    volatile = ("commit", "device")  # the machine's load at the re-run's start is in the device description
    assert {k: v for k, v in after[finished].items() if k not in volatile} == \
        {k: v for k, v in before[finished].items() if k not in volatile}


def test_a_concurrent_run_of_the_same_suite_is_refused(suite, capsys):
    import fcntl

    suite.runs.mkdir(parents=True, exist_ok=True)
    with open(suite.runs / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit, match="in progress"):
            suite.run(capsys)


def test_stability_sweep_plans_only_the_runs_the_comparison_lacks(tmp_path):
    rlvr = load_script("rlvr")
    default = REGISTRY["lora"].default_lr
    assert REGISTRY["offprincipal"].default_lr == default
    suite = rlvr.Suite(name="t", methods=("offprincipal", "lora"), seeds=3, single_seeds=0, sweep={},
                       ablation_top_k=(), fixed_lr=(("lora", 1e-3),), stability_seeds=2,
                       stability={"offprincipal": (default, 1e-3), "lora": (default, 1e-3, 3e-3)})
    specs = rlvr.plan(suite, {})
    extra = [(s.method, s.lr, s.seed) for s in specs if s.stability]
    # offprincipal and lora at their default rate, and lora at 1e-3 (a fixed-rate arm), are runs of the comparison
    assert extra == [("offprincipal", 1e-3, 0), ("lora", 3e-3, 0), ("offprincipal", 1e-3, 1), ("lora", 3e-3, 1)]
    assert all(s.stability for s in specs[-4:])  # after every run of the comparison
    assert len({s.run_id for s in specs}) == len(specs) == 3 * 2 + 3 + 4
    assert {s.role for s in specs if s.stability} == {"stability"}

    # a stability record keeps its role when the roles are rewritten after a run
    paths = rlvr.Paths(suite, tmp_path / "results", tmp_path / "runs")
    paths.records.mkdir(parents=True)
    spec = next(s for s in specs if s.stability)
    record = {"run_id": spec.run_id, "method": spec.method, "seed": spec.seed, "lr": spec.lr, "top_k": spec.top_k,
              "arm": spec.arm, "role": rlvr.role(spec, {})}
    (paths.records / f"{spec.run_id}.json").write_text(json.dumps(record))
    rlvr._update_roles(suite, paths, {})
    assert strict(paths.records / f"{spec.run_id}.json")["role"] == "stability"


@pytest.mark.parametrize("item, match", [("nonsense=1e-3", "not a method"), ("lora=fast", "METHOD=LR")])
def test_stability_rates_are_checked(item, match):
    rlvr = load_script("rlvr")
    with pytest.raises(SystemExit, match=match):
        rlvr._suite_from(rlvr.build_parser().parse_args(["run", "--stability", item]))


def test_a_tagged_arm_reruns_existing_runs_under_its_own_ids_and_name():
    """offprincipal:seeds=3:tag=rerun plans the three seeds of the offprincipal arm again (a record of the untagged
    run does not count as done), named "offprincipal rerun", run ids ending in -rerun."""
    rlvr = load_script("rlvr")
    args = rlvr.build_parser().parse_args(["run", "--methods", "offprincipal", "--sweep", "--single-seeds", "0",
                                           "--ablation-top-k", "--fixed-lr", "--seeds", "3",
                                           "--arm", "offprincipal:seeds=3:tag=rerun"])
    specs = rlvr.plan(rlvr._suite_from(args), {})
    main = [s for s in specs if s.arm == "offprincipal"]
    rerun = [s for s in specs if s.extra >= 0]
    assert [s.run_id for s in main] == [f"offprincipal-k32-lr0.0002-s{i}" for i in range(3)]
    assert [s.run_id for s in rerun] == [f"offprincipal-k32-lr0.0002-s{i}-rerun" for i in range(3)]
    assert {s.arm for s in rerun} == {"offprincipal rerun"} and {s.role for s in rerun} == {"main"}
    assert [(s.method, s.seed, s.lr, s.top_k) for s in rerun] == [(s.method, s.seed, s.lr, s.top_k) for s in main]
    # :first=S takes an arm's later seeds only (a second process sharing the work), under the arm's own ids
    later = rlvr.ExtraArm.parse("offprincipal:k=128:seeds=1:first=1").specs(rlvr._suite_from(args), 0)
    assert [(s.run_id, s.arm) for s in later] == [("offprincipal-k128-lr0.0002-s1", "offprincipal k=128")]
    with pytest.raises(SystemExit, match="first=S"):
        rlvr.ExtraArm.parse("lora:first=-1")


def test_extra_arms_are_planned_after_the_others_in_the_order_given():
    """The suite command of issue 18: its 13 runs, in its order, with the arm names the report knows."""
    rlvr = load_script("rlvr")
    arms = ["offprincipal-random:seeds=3", "lora:lr=1e-4:seeds=2", "offprincipal:lr=1e-4:seeds=2",
            "offprincipal:k=8:seeds=2", "offprincipal:k=128:seeds=2", "geora:seeds=2"]
    args = rlvr.build_parser().parse_args(["run", "--methods", "offprincipal", "lora", "--sweep", "--single-seeds", "0",
                                           "--ablation-top-k", "--fixed-lr", "--arm", *arms])
    suite = rlvr._suite_from(args)
    specs = rlvr.plan(suite, {})
    extra = [s for s in specs if s.extra >= 0]
    assert specs[-len(extra):] == extra and len(extra) == 13
    assert [(s.arm, s.seed) for s in extra] == [
        ("offprincipal-random", 0), ("offprincipal-random", 1), ("offprincipal-random", 2), ("lora lr=0.0001", 0),
        ("lora lr=0.0001", 1), ("offprincipal lr=0.0001", 0), ("offprincipal lr=0.0001", 1), ("offprincipal k=8", 0),
        ("offprincipal k=8", 1), ("offprincipal k=128", 0), ("offprincipal k=128", 1), ("geora", 0), ("geora", 1)]
    assert extra[0].run_id == "offprincipal-random-k32-lr0.0002-s0" and extra[7].run_id == "offprincipal-k8-lr0.0002-s0"
    assert {s.role for s in extra} == {"main"}
    for bad, match in (("nonsense:seeds=2", "not a method"), ("lora:lr=fast", "METHOD\\[:lr=LR\\]"),
                       ("lora:depth=2", "METHOD\\[:lr=LR\\]"), ("lora:tag=Re run", "tag=WORD"),
                       ("lora:tag=", "tag=WORD")):
        with pytest.raises(SystemExit, match=match):
            rlvr.ExtraArm.parse(bad)
