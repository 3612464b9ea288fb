"""benchmarks/rlvr_report.py: statistics over seeds, comparisons, and the report written from synthetic records."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "rlvr_report.py"
spec = importlib.util.spec_from_file_location("rlvr_report", SCRIPT)
rlvr_report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rlvr_report)

LAYERS = [f"model.layers.{i}.self_attn.{kind}" for i in range(3) for kind in ("q_proj", "v_proj")]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_record(arm, seed, accuracy_after, method=None, role="main", lr=3e-4, **fields):
    """A run record in the schema of benchmarks/rlvr.py, with realistic values derived from the arguments."""
    method = method or arm.split(" ")[0]
    scale = {"full": 40.0, "sft": 90.0}.get(method, 1.0)
    record = {
        "suite": "smollm2-arith", "run_id": f"{arm.replace(' ', '')}-lr{lr}-s{seed}", "method": method, "arm": arm,
        "role": role, "seed": seed, "steps": 60, "lr": lr, "rank": None if method in ("full", "sft") else 32,
        "top_k": 32, "metrics_k": 32, "accuracy_before": 0.312, "accuracy_after": accuracy_after, "eval_n": 500,
        "reward_first": 0.28 + 0.01 * seed, "reward_last": 0.51 + 0.02 * seed,
        "reward_curve": [0.25 + 0.004 * step + 0.01 * ((step * 7 + seed) % 5) for step in range(60)],
        "step_time_s": 4.1 + 0.1 * seed, "train_seconds": 250.0, "peak_mem_mb": 3120.5 + 10 * seed,
        "trainable_params": 4_884_480, "nss_mean": 2.39e-05 * scale, "max_angle_mean": 0.84 * scale,
        "bf16_sparsity": 0.71, "overlap_principal": 0.43, "overlap_lowmag": 0.55, "leak": 0.012,
        "layer_names": LAYERS, "layer_nss": [2e-05 * scale * (1 + i) for i in range(len(LAYERS))],
        "layer_max_angle": [0.5 * scale + 0.1 * i for i in range(len(LAYERS))],
        "device": "NVIDIA H100 80GB HBM3", "commit": "bfe3d8f", "workers": 4,
        "settings": {"num_generations": 8, "prompts_per_step": 16, "max_completion_length": 64, "temperature": 1.0,
                     "bf16": True, "model": "HuggingFaceTB/SmolLM2-135M-Instruct", "task": "arithmetic"},
    }
    record.update(fields)
    return record


OFFPRINCIPAL = [0.412, 0.436, 0.398]
LORA = [0.371, 0.389, 0.380]
FULL = [0.405, 0.431, 0.420]


def make_records():
    records = [make_record("offprincipal", s, a, step_time_s=4.52 + 0.07 * s, peak_mem_mb=3410.0 + 12 * s)
               for s, a in enumerate(OFFPRINCIPAL)]
    records += [make_record("lora", s, a, leak=leak) for s, (a, leak) in enumerate(zip(LORA, [0.031, None, 0.027]))]
    records += [make_record("full", s, a, lr=1e-5) for s, a in enumerate(FULL)]
    records += [
        make_record("pissa", 0, 0.362),
        make_record("offprincipal k=8", 0, 0.401),
        make_record("my-new-arm", 0, 0.350, method="lora"),
        make_record("lora", 0, 0.341, role="sweep", lr=1e-4),
        make_record("sft", 0, 0.455, lr=2e-5, reward_first=None, reward_last=None, reward_curve=None,
                    loss_curve=[1.9 - 0.02 * step for step in range(60)]),
    ]
    return records


def write_suite(folder: Path, records) -> Path:
    (folder / "records").mkdir(parents=True)
    for record in records:
        (folder / "records" / f"{record['run_id']}.json").write_text(json.dumps(record))
    return folder


def by_arm(summary):
    return {entry["arm"]: entry for entry in summary}


def test_load_records_sorted_and_malformed(tmp_path):
    folder = write_suite(tmp_path / "suite", make_records())
    records = rlvr_report.load_records(folder)
    assert [r["run_id"] for r in records] == sorted(r["run_id"] for r in make_records())
    (folder / "records" / "broken.json").write_text('{"run_id": "broken", "arm": ')
    with pytest.raises(ValueError, match="broken.json"):
        rlvr_report.load_records(folder)
    (folder / "records" / "broken.json").write_text('{"run_id": "broken"}')
    with pytest.raises(ValueError, match="broken.json"):
        rlvr_report.load_records(folder)


def test_summarize_arms_means_and_standard_errors():
    summary = rlvr_report.summarize_arms(make_records())
    assert [e["arm"] for e in summary] == ["full", "offprincipal", "offprincipal k=8", "lora", "pissa", "sft",
                                          "my-new-arm"]
    op = by_arm(summary)["offprincipal"]
    assert op["n"] == 3 and op["seeds"] == [0, 1, 2] and op["lr"] == [3e-4]
    accuracy = op["metrics"]["accuracy_after"]
    # mean 1.246 / 3; squared deviations sum to 7.38667e-4, so SE = sqrt(7.38667e-4 / 2) / sqrt(3)
    assert accuracy["mean"] == pytest.approx(0.415333, abs=1e-6)
    assert accuracy["se"] == pytest.approx(0.0110955, abs=1e-6)
    assert accuracy["n"] == 3
    assert op["metrics"]["accuracy_delta"]["mean"] == pytest.approx(0.415333 - 0.312, abs=1e-6)
    assert op["metrics"]["step_time_s"]["mean"] == pytest.approx(4.59)
    assert op["metrics"]["step_time_s"]["se"] == pytest.approx(0.07 / math.sqrt(3))

    lora = by_arm(summary)["lora"]
    assert lora["n"] == 3  # the sweep run is not part of the arm
    leak = lora["metrics"]["leak"]  # one null skipped: SE of two values = |a - b| / 2
    assert (leak["mean"], leak["n"]) == (pytest.approx(0.029), 2) and leak["se"] == pytest.approx(0.002)

    pissa = by_arm(summary)["pissa"]["metrics"]["accuracy_after"]
    assert pissa == {"mean": pytest.approx(0.362), "se": None, "n": 1}
    assert by_arm(summary)["sft"]["metrics"]["reward_last"] == {"mean": None, "se": None, "n": 0}


def test_compare_verdicts():
    summary = rlvr_report.summarize_arms(make_records())
    beyond = rlvr_report.compare(summary, "offprincipal", "lora")
    assert beyond["diff"] == pytest.approx(0.415333 - 0.38, abs=1e-6)
    se_lora = math.sqrt(((0.371 - 0.38) ** 2 + (0.389 - 0.38) ** 2) / 2 / 3)
    assert beyond["se"] == pytest.approx(math.hypot(0.0110955, se_lora), abs=1e-6)
    assert beyond["verdict"] == "beyond 1 SE"
    assert rlvr_report.compare(summary, "full", "offprincipal")["verdict"] == "within noise"
    single = rlvr_report.compare(summary, "pissa", "lora")
    assert single["se"] is None and single["verdict"] == "single seed: no error bar"
    with pytest.raises(KeyError):
        rlvr_report.compare(summary, "dora", "lora")


def test_write_report(tmp_path, capsys):
    folder = write_suite(tmp_path / "smollm2-arith", make_records())
    (folder / "notes.md").write_text("Hand-written: the k=8 arm is a pilot.\n")
    rlvr_report.main([str(folder)])
    path = Path(capsys.readouterr().out.strip())
    assert path == folder / "report.md"
    text = path.read_text()
    for arm in ["full", "offprincipal", "offprincipal k=8", "lora", "pissa", "sft", "my-new-arm"]:
        assert f"| {arm} |" in text
    assert "# RLVR benchmark: smollm2-arith" in text and "NVIDIA H100 80GB HBM3" in text and "bfe3d8f" in text
    assert "14 (13 main, 1 sweep)" in text
    assert "41.5 ± 1.1" in text and "2.39e-05" in text and "4,884,480" in text
    assert "## Learning-rate sweep" in text and "| lora | lora | 0.0001 | 1 | 0.388 | 0.51 | 34.1 |  |" in text  # mean reward: 0.25 + 0.004·29.5 + 0.01·2
    assert "- offprincipal vs lora, held-out accuracy: 41.5% (n=3) vs 38.0% (n=3); difference +3.5 ± 1.2 pp: " \
           "beyond 1 SE." in text
    assert "- pissa vs lora, held-out accuracy" in text and "single seed: no error bar" in text
    assert "- sft vs full, NSS" in text
    assert "- offprincipal vs lora, step time (s): 4.59 (n=3) vs 4.2 (n=3), ratio 1.09" in text
    assert "sparse-safe vs" not in text
    assert text.rstrip().endswith("## Notes\n\nHand-written: the k=8 arm is a pilot.")
    for name in ["reward_curves.png", "layer_nss.png", "layer_max_angle.png", "accuracy.png"]:
        assert f"(plots/{name})" in text
        assert (folder / "plots" / name).read_bytes()[:8] == PNG_MAGIC
    assert sorted(p.name for p in folder.rglob(".*")) == []  # no temporary files left


def test_write_report_without_records(tmp_path):
    (tmp_path / "records").mkdir()
    with pytest.raises(ValueError, match="no records"):
        rlvr_report.write_report(tmp_path)


def test_gain_against_forgetting_section(tmp_path):
    """With retention fields, the report has the per-arm gain/forgetting table, the scatter plot, and a plain
    reading that says which arm forgets less at equal gain (here offprincipal: equal gains, lower drift)."""
    drifts = {"offprincipal": [0.010, 0.012, 0.011], "lora": [0.030, 0.034, 0.029], "full": [0.050, 0.070, 0.060]}
    records = []
    for arm, accuracies in (("offprincipal", [0.40, 0.41, 0.39]), ("lora", [0.40, 0.39, 0.41]),
                            ("full", [0.45, 0.46, 0.47])):
        records += [make_record(arm, s, a, retention_nll_drift=drifts[arm][s], retention_task_delta=-0.01 * s,
                                retention_kl=None if arm == "full" else 2 * drifts[arm][s],
                                lr=1e-5 if arm == "full" else 3e-4) for s, a in enumerate(accuracies)]
    folder = tmp_path / "suite"
    (folder / "records").mkdir(parents=True)
    for r in records:
        (folder / "records" / f"{r['run_id']}.json").write_text(json.dumps(r))
    report = rlvr_report.write_report(folder).read_text()
    assert "## Gain against forgetting" in report and "plots/gain_vs_forgetting.png" in report
    assert (folder / "plots" / "gain_vs_forgetting.png").read_bytes()[:8] == PNG_MAGIC
    assert "Verdict: the gains are not distinguishable; **lora drifts more** (interval excludes 0)" in report
    table = report.split("## Gain against forgetting")[1]
    assert "forgetting: KL to base (nats/token)" in table
    assert "| 0.022 ± 0.00115 |" in table and "| n/a |" in table  # offprincipal's KL; full's runs predate it
    versus_full = report.split("offprincipal vs full")[1].split("\n")[0]
    assert "gain -6.0 (95% CI" in versus_full and "Verdict: full gains more; **full drifts more**" in versus_full


def test_forgetting_reading_when_one_arm_gains_more_and_forgets_no_more(tmp_path):
    """Unequal gains: the arm that gains more without drifting more (within noise) is said to be better on both
    axes; one that loses more on the retention task is a trade-off."""
    def arms(lora_task):
        records = []
        for arm, accuracies, drifts, task in (("offprincipal", [0.50, 0.51, 0.49], [0.010, 0.013, 0.011], [0.0] * 3),
                                              ("lora", [0.40, 0.39, 0.41], [0.012, 0.011, 0.013], lora_task)):
            records += [make_record(arm, s, a, retention_nll_drift=drifts[s], retention_task_delta=task[s])
                        for s, a in enumerate(accuracies)]
        return records

    report = rlvr_report.write_report(write_suite(tmp_path / "a", arms([0.01, -0.01, 0.0]))).read_text()
    assert ("Verdict: offprincipal gains more; **no detectable difference in forgetting** (every forgetting interval "
            "covers 0") in report
    assert "retention task +0.0 (95% CI -2.5 to +2.5) pp" in report  # Welch: t(0.975, 2) · 0.01/√3 · ... = ±2.5 pp
    report = rlvr_report.write_report(write_suite(tmp_path / "b", arms([0.10, 0.12, 0.11]))).read_text()
    assert "Verdict: offprincipal gains more; **offprincipal loses more on the retention task**" in report


def test_no_forgetting_section_without_retention(tmp_path):
    folder = tmp_path / "suite"
    (folder / "records").mkdir(parents=True)
    for r in make_records():
        (folder / "records" / f"{r['run_id']}.json").write_text(json.dumps(r))
    assert "Gain against forgetting" not in rlvr_report.write_report(folder).read_text()


def test_records_of_a_former_method_spelling_are_read_and_migrated(tmp_path):
    """Records written as `full-offprincipal` (before the method registry fixed the spelling) load as
    `offprincipal-full`; the harness migrates the files once, and the report reads them either way."""
    spec = importlib.util.spec_from_file_location("rlvr", SCRIPT.with_name("rlvr.py"))
    rlvr = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("rlvr", rlvr)  # dataclasses look their module up there
    spec.loader.exec_module(rlvr)
    folder = tmp_path / "suite"
    (folder / "records").mkdir(parents=True)
    old = make_record("full-offprincipal", 0, 0.4, lr=2e-5)
    (folder / "records" / f"{old['run_id']}.json").write_text(json.dumps(old))
    loaded = rlvr_report.load_records(folder)
    assert [(r["method"], r["arm"]) for r in loaded] == [("offprincipal-full", "offprincipal-full")]
    paths = rlvr.Paths(rlvr.Suite(name="suite"), tmp_path, tmp_path / "runs")
    assert len(paths.migrate()) == 1 and paths.migrate() == []
    (record,) = paths.done().values()
    assert record["method"] == "offprincipal-full" and record["run_id"].startswith("offprincipal-full")


def test_stability_section(tmp_path):
    """The stability sweep groups every run of its methods by rate (main, fixed-rate and stability runs; a twin of
    the same method, rate and seed once; the top-k ablation left out), classifies each run against the base model's
    accuracy by its 95% interval, and says per method where runs collapsed."""

    def run(arm, seed, after, lr, role="stability", **fields):
        low, high = after - 0.06, after + 0.06  # the shape of a Wilson interval on a few hundred prompts
        return make_record(arm, seed, after, lr=lr, role=role, accuracy_after_ci95_low=low,
                           accuracy_after_ci95_high=high, retention_nll_drift=0.01 * lr / 1e-3, **fields)

    records = [run("offprincipal", s, 0.40 + 0.01 * s, 3e-4, role="main", update_rel_mean=0.002,
                   grad_norm_curve=[0.5, 0.0, 0.7, 0.0, 0.6]) for s in range(3)]
    records += [run("offprincipal k=8", 0, 0.05, 3e-4, role="main")]  # not a rate of the sweep: left out
    records += [run("lora", s, 0.38, 3e-4, role="main") for s in range(2)]
    records += [run("lora lr=0.001", s, 0.33, 1e-3, role="main", method="lora") for s in range(2)]
    records += [run("offprincipal lr=0.001", 0, 0.36, 1e-3), run("offprincipal lr=0.001", 1, 0.10, 1e-3),
                run("lora lr=0.003", 0, 0.05, 3e-3), run("lora lr=0.003", 1, 0.08, 3e-3)]
    groups = rlvr_report.stability_groups(records)
    assert list(groups) == [("offprincipal", 3e-4), ("offprincipal", 1e-3), ("lora", 3e-4), ("lora", 1e-3),
                            ("lora", 3e-3)]
    assert [r["seed"] for r in groups[("offprincipal", 3e-4)]] == [0, 1, 2]
    assert [rlvr_report.run_outcome(r) for r in groups[("offprincipal", 1e-3)]] == ["no clear change", "collapsed"]
    assert rlvr_report.run_outcome(records[0]) == "learned"  # 0.40 − 0.06 > 0.312

    folder = write_suite(tmp_path / "suite", records)
    report = rlvr_report.write_report(folder).read_text()
    section = report.split("## Stability sweep")[1].split("\n## ")[0]
    assert "| offprincipal | 0.001 | 0, 1 | 36.0, 10.0 |" in section
    assert "- offprincipal: no run collapsed at 0.0003; at least one run collapsed at 0.001" in section
    assert "- lora: no run collapsed at 0.0003, 0.001; at least one run collapsed at 0.003" in section
    assert "| 0.002 | 0.6 |" in section  # ‖ΔW‖/‖W0‖ and the median grad norm (steps without a gradient left out)
    assert (folder / "plots" / "stability.png").read_bytes()[:8] == PNG_MAGIC
    # each adapter at its best rate: offprincipal 3e-4 (40, 41, 42%) against lora 3e-4 (38, 38%), Welch over seeds
    # (these records have no per-prompt outcomes)
    best = next(line for line in section.splitlines() if line.startswith("- **Each adapter at its best rate**"))
    assert ("offprincipal at 0.0003: 41.0 ± 0.6% (3 seeds), lora at 0.0003: 38.0 ± 0.0% (2 seeds); offprincipal "
            "minus lora +3.0 (95% CI") in best and "(Welch over seeds, unpaired)" in best


def test_a_tagged_rerun_stays_out_of_the_stability_groups_and_best_rates_pair_on_outcomes(tmp_path):
    """A re-run under a tag ("offprincipal rerun") repeats seeds of its arm: it is no extra seed of the rate. When
    both best-rate arms have per-prompt outcomes, they are compared paired over seeds × prompts."""
    records = outcome_records("offprincipal lr=0.0001", [0.40, 0.42], method="offprincipal", lr=1e-4)
    records += outcome_records("lora lr=0.0001", [0.30, 0.32], method="lora", lr=1e-4)
    records += outcome_records("offprincipal", [0.36, 0.37], lr=2e-4) + outcome_records("lora", [0.31, 0.31], lr=2e-4)
    records += outcome_records("offprincipal rerun", [0.90, 0.90], method="offprincipal", lr=2e-4)
    records += [make_record(f"{m} lr=0.001", s, 0.02, method=m, lr=1e-3, role="stability")
                for m in ("offprincipal", "lora") for s in range(2)]
    groups = rlvr_report.stability_groups(records)
    assert [r["arm"] for r in groups[("offprincipal", 2e-4)]] == ["offprincipal", "offprincipal"]
    section = rlvr_report.write_report(write_suite(tmp_path / "s", records)).read_text().split(
        "## Stability sweep")[1].split("\n## ")[0]
    best = next(line for line in section.splitlines() if line.startswith("- **Each adapter at its best rate**"))
    assert "offprincipal at 0.0001: 41.0 ± 1.0% (2 seeds), lora at 0.0001: 31.0 ± 1.0% (2 seeds)" in best
    assert "offprincipal minus lora +10.0 (95% CI +" in best and "paired over seeds [0, 1] × prompts" in best
    paired = rlvr_report.write_report(write_suite(tmp_path / "p", records)).read_text().split(
        "## Paired tests over seeds × prompts")[1].split("\n## ")[0]
    assert "| offprincipal lr=0.0001 | lora lr=0.0001 | 0, 1 | +10.0 (95% CI +" in paired  # the same-rate pair
    # offprincipal's best rate is 2e-4, whose runs predate outcomes: the pairing takes them from its re-run
    records = [r for r in records if r["arm"] not in ("offprincipal lr=0.0001", "offprincipal", "offprincipal rerun")]
    records += [make_record("offprincipal", s, a, lr=2e-4) for s, a in enumerate([0.45, 0.46])]
    records += outcome_records("offprincipal rerun", [0.44, 0.44], method="offprincipal", lr=2e-4)
    section = rlvr_report.write_report(write_suite(tmp_path / "t", records)).read_text().split(
        "## Stability sweep")[1].split("\n## ")[0]
    best = next(line for line in section.splitlines() if line.startswith("- **Each adapter at its best rate**"))
    assert "offprincipal at 0.0002: 45.5 ± 0.5% (2 seeds), lora at 0.0001: 31.0 ± 1.0% (2 seeds)" in best
    assert "minus lora +13.0 (95% CI +" in best and "outcomes of the re-run where a run predates them" in best


def test_no_stability_section_without_stability_runs(tmp_path):
    folder = write_suite(tmp_path / "suite", make_records())
    assert "Stability sweep" not in rlvr_report.write_report(folder).read_text()


def test_retention_fields_carry_the_kl_to_base():
    """benchmarks/rlvr.py copies the KL to the base from a run's summary into its record (None for runs without it)."""
    spec = importlib.util.spec_from_file_location("rlvr", SCRIPT.with_name("rlvr.py"))
    rlvr = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("rlvr", rlvr)
    spec.loader.exec_module(rlvr)
    retention = {"nll_drift_nats_per_token": -0.02, "kl_to_base_nats_per_token": 0.031, "kl_top_m": 64,
                 "base_nll_nats_per_token": 0.4, "prompts": 72, "task": "capitals",
                 "task_accuracy": {"after": 0.5, "after_n": 100}}
    fields = rlvr._retention_fields(retention, {"retention_task": {"accuracy": 0.55}})
    assert fields["retention_kl"] == 0.031 and fields["retention_kl_top_m"] == 64
    assert fields["retention_nll_drift"] == -0.02 and fields["retention_task_delta"] == pytest.approx(-0.05)
    older = {k: v for k, v in retention.items() if not k.startswith("kl_")}
    assert rlvr._retention_fields(older, {})["retention_kl"] is None


def outcome_records(arm, accuracies_per_seed, prompts=200, seed0=0, base=None, strict_drop=0.0, **fields):
    """Records whose per-prompt outcomes have, per seed, exactly the given accuracy on shared easy-first prompts."""
    import numpy as np

    rng = np.random.default_rng(abs(hash(arm)) % 2**32)
    records = []
    for s, acc in enumerate(accuracies_per_seed, start=seed0):
        correct = [0] * prompts
        for i in rng.permutation(prompts)[: round(acc * prompts)]:
            correct[int(i)] = 1
        strict = [c if rng.random() >= strict_drop else 0 for c in correct]
        records.append(make_record(arm, s, acc, correct_after=correct, strict_correct_after=strict,
                                   correct_before=base, accuracy_strict_after=sum(strict) / prompts,
                                   lenient_strict_disagree=sum(a != b for a, b in zip(correct, strict)) / prompts,
                                   **fields))
    return records


def test_geometry_section_not_yet_run(tmp_path):
    report = rlvr_report.write_report(write_suite(tmp_path / "s", make_records())).read_text()
    geometry = report.split("## Is it the geometry?")[1].split("\n## ")[0]
    assert "**Not yet run**: no records of offprincipal-random." in geometry
    assert "No arm has per-prompt outcomes yet." in report
    assert "No record carries the strict score yet" in report


def test_geometry_section_recovers_a_known_effect_and_says_so(tmp_path):
    records = outcome_records("offprincipal", [0.40, 0.42, 0.41]) + outcome_records("offprincipal-random", [0.30, 0.31, 0.29])
    records += outcome_records("lora", [0.31, 0.30, 0.32], strict_drop=0.5)
    report = rlvr_report.write_report(write_suite(tmp_path / "s", records)).read_text()
    geometry = report.split("## Is it the geometry?")[1].split("\n## ")[0]
    line = geometry.split("offprincipal minus offprincipal-random, held-out accuracy: ")[1]
    assert line.startswith("+11.0 (95% CI +") and "paired over 3 seed(s) × 200 prompts" in line
    assert "**Yes, on this evidence" in geometry and "For scale, offprincipal-random minus lora: -1.0" in geometry
    paired = report.split("## Paired tests over seeds × prompts")[1].split("\n## ")[0]
    assert "| offprincipal-random | offprincipal | 0, 1, 2 | -11.0 (95% CI" in paired
    strict = report.split("## Strict and lenient accuracy")[1].split("\n## ")[0]
    lora_row = next(line for line in strict.splitlines() if line.startswith("| lora |"))
    cells = [c.strip() for c in lora_row.strip("|").split("|")]
    assert cells[2] == "31.0 ± 0.6" and float(cells[3].split()[0]) < 20 and float(cells[4].split()[0]) > 10


def test_geometry_section_without_effect_says_not_shown(tmp_path):
    records = outcome_records("offprincipal", [0.40, 0.41]) + outcome_records("offprincipal-random", [0.41, 0.40])
    report = rlvr_report.write_report(write_suite(tmp_path / "s", records)).read_text()
    geometry = report.split("## Is it the geometry?")[1].split("\n## ")[0]
    assert "**Not shown**: offprincipal and offprincipal-random cannot be told apart" in geometry


def test_geometry_falls_back_to_welch_when_one_arm_lacks_outcomes(tmp_path):
    records = [make_record("offprincipal", s, a) for s, a in enumerate([0.365, 0.37, 0.36])]  # pre-issue-18 records
    records += outcome_records("offprincipal-random", [0.30, 0.31, 0.29])
    report = rlvr_report.write_report(write_suite(tmp_path / "s", records)).read_text()
    geometry = report.split("## Is it the geometry?")[1].split("\n## ")[0]
    assert "Welch's interval over seeds, unpaired" in geometry and "**Yes, on this evidence" in geometry
    assert "left out: offprincipal" in report


def test_geometry_pairs_the_rerun_of_an_arm_whose_records_lack_outcomes(tmp_path):
    """offprincipal's records predate per-prompt outcomes; its re-run ("offprincipal rerun", rlvr.py :tag=rerun)
    has them, so the geometry question and the reference pairings use the re-run, and the report shows the re-run's
    accuracies beside the first runs'."""
    records = [make_record("offprincipal", s, a, commit="980e0cd") for s, a in enumerate([0.365, 0.37, 0.36])]
    records += outcome_records("offprincipal rerun", [0.40, 0.42, 0.41], method="offprincipal", commit="651c5f4")
    records += outcome_records("offprincipal-random", [0.30, 0.31, 0.29])
    report = rlvr_report.write_report(write_suite(tmp_path / "s", records)).read_text()
    geometry = report.split("## Is it the geometry?")[1].split("\n## ")[0]
    line = geometry.split("offprincipal rerun minus offprincipal-random, held-out accuracy: ")[1]
    assert line.startswith("+11.0 (95% CI +") and "paired over 3 seed(s) × 200 prompts" in line
    assert "seed 0: 36.5 → 40.0%, seed 1: 37.0 → 42.0%, seed 2: 36.0 → 41.0% (commits 980e0cd → 651c5f4)." in geometry
    assert "repeats the first runs exactly" not in geometry  # other accuracies: not the same runs
    same = [dict(r, accuracy_after=o["accuracy_after"]) if r["arm"] == "offprincipal" else r
            for r, o in zip(records, records[3:6] + records[3:])]  # first runs with the re-run's figures
    geometry = rlvr_report.write_report(write_suite(tmp_path / "same", same)).read_text()
    assert "The re-run repeats the first runs exactly (the same reward at every step" in geometry
    paired = report.split("## Paired tests over seeds × prompts")[1].split("\n## ")[0]
    assert "| offprincipal-random | offprincipal rerun | 0, 1, 2 | -11.0 (95% CI" in paired
    # a re-run without outcomes is not preferred: the arm's own Welch interval over its seeds stays
    records = [r for r in records if r["arm"] != "offprincipal rerun"]
    records += [make_record("offprincipal rerun", 0, 0.9, method="offprincipal")]
    geometry = rlvr_report.write_report(write_suite(tmp_path / "t", records)).read_text().split(
        "## Is it the geometry?")[1].split("\n## ")[0]
    assert "offprincipal minus offprincipal-random" in geometry and "Welch's interval" in geometry


def test_paired_gain_over_the_base_model(tmp_path):
    base = [1] * 40 + [0] * 160  # 20% on the same prompts
    records = outcome_records("lora", [0.20, 0.20], base=base)
    report = rlvr_report.write_report(write_suite(tmp_path / "s", records)).read_text()
    row = next(line for line in report.splitlines() if line.startswith("| lora | base model |"))
    assert "| +0.0 (95% CI" in row  # same accuracy as the base: no gain, and the interval covers 0
    low = float(row.split("95% CI ")[1].split(" to ")[0])
    assert low < 0
