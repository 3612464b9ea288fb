"""The report of an RLVR benchmark suite: ``report.md`` and plots from the per-run JSON records.

``benchmarks/rlvr.py`` writes one record per finished run into ``benchmarks/results/<suite>/records/``; this script
turns them into ``benchmarks/results/<suite>/report.md`` (settings, one table row per arm with mean ± standard error
over seeds, the learning-rate sweep, plots under ``plots/``, and a "Reading" section of pairwise comparisons computed
from the numbers). Hand-written prose goes in ``<suite>/notes.md``; it is appended under "## Notes".

    .venv/bin/python benchmarks/rlvr_report.py benchmarks/results/<suite>
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
from collections import defaultdict
from pathlib import Path


from offprincipal.experiment.methods import METHODS, canonical_name
from offprincipal.experiment.stats import mcnemar_p, paired_bootstrap, welch_interval
from offprincipal.files import atomic_file, write_text_atomic
from offprincipal.experiment.report import PLOTS, markdown_table as _table, pyplot as _pyplot

# the registry's order, with the full-parameter reference arms first
_REFERENCE_ARMS = ("full", "offprincipal-full")
ARM_ORDER = [*_REFERENCE_ARMS, *(name for name in METHODS if name not in _REFERENCE_ARMS)]
METRICS = {
    "accuracy_after": "held-out accuracy", "accuracy_delta": "Δ accuracy", "reward_first": "reward (first fifth)",
    "reward_last": "reward (last fifth)", "step_time_s": "step time (s)", "peak_mem_mb": "peak memory (MB)",
    "trainable_params": "trainable params", "nss_mean": "NSS", "max_angle_mean": "max angle (°)",
    "bf16_sparsity": "bf16 sparsity", "overlap_principal": "overlap principal", "overlap_lowmag": "overlap low-mag",
    "leak": "principal leak", "retention_nll_drift": "NLL drift (nats/token)",
    "retention_kl": "KL to base (nats/token)", "retention_task_delta": "Δ retention task",
}
PERCENT = {"accuracy_after", "accuracy_delta", "retention_task_delta"}
LAYER_ARMS = ["full", "offprincipal-full", "offprincipal", "lora", "pissa", "sft"]  # methods of the registry
REQUIRED = ("run_id", "arm", "role", "method")
_K_ARM = re.compile(r"offprincipal k=(\d+)$")
_TAG = re.compile(r" [a-z][a-z0-9]*$")  # an arm re-run under a tag (rlvr.py --arm …:tag=WORD): "offprincipal rerun"


# --- records and statistics ---------------------------------------------------------------------------------------


def load_records(folder) -> list[dict]:
    """Every ``folder/records/*.json`` as a dict, sorted by run_id; ValueError naming the file if one is malformed
    (not JSON, not an object, or missing one of run_id, arm, role, method)."""
    records = []
    for path in sorted((Path(folder) / "records").glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not valid JSON ({error})") from error
        if not isinstance(record, dict) or any(key not in record for key in REQUIRED):
            raise ValueError(f"{path}: not a run record (needs the fields {', '.join(REQUIRED)})")
        old, new = record["method"], canonical_name(record["method"])  # records of a former method spelling
        if old != new:
            record.update(method=new, arm=record["arm"].replace(old, new, 1), run_id=record["run_id"].replace(old, new, 1))
        records.append(record)
    return sorted(records, key=lambda r: r["run_id"])


def _finite(values) -> list[float]:
    """The values that are numbers (None and NaN dropped), as floats."""
    return [float(v) for v in values if v is not None and not math.isnan(v)]


def _stat(values) -> dict:
    """mean, standard error (sample std / √n; None when n < 2) and n of the finite values (mean None when n = 0)."""
    xs = _finite(values)
    n = len(xs)
    return {"mean": sum(xs) / n if n else None, "se": statistics.stdev(xs) / math.sqrt(n) if n > 1 else None, "n": n}


def _metric(record: dict, name: str):
    """A record's value of a summary metric; ``accuracy_delta`` is accuracy_after − accuracy_before."""
    if name == "accuracy_delta":
        after, before = record.get("accuracy_after"), record.get("accuracy_before")
        return None if after is None or before is None else after - before
    return record.get(name)


def _arm_key(arm: str) -> tuple:
    """Preferred arm order (``offprincipal k=…`` after ``offprincipal``, by k); unknown arms last, alphabetically."""
    match = _K_ARM.match(arm)
    if match:
        return (ARM_ORDER.index("offprincipal"), int(match.group(1)), arm)
    return (ARM_ORDER.index(arm), 0, arm) if arm in ARM_ORDER else (len(ARM_ORDER), 0, arm)


def _group(records, key) -> dict:
    """Records grouped by ``key(record)``, in first-seen order."""
    groups = defaultdict(list)
    for record in records:
        groups[key(record)].append(record)
    return groups


def summarize_arms(records) -> list[dict]:
    """One entry per arm of the ``role == "main"`` records, in arm order: ``arm``, ``method``, ``n`` (runs), ``seeds``,
    ``lr`` (distinct values) and ``metrics`` mapping each name of :data:`METRICS` to its mean, SE and n over seeds
    (nulls skipped)."""
    main = [r for r in records if r.get("role") == "main"]
    summary = []
    for arm, group in sorted(_group(main, lambda r: r["arm"]).items(), key=lambda item: _arm_key(item[0])):
        summary.append({
            "arm": arm, "method": ", ".join(sorted({r["method"] for r in group})), "n": len(group),
            "seeds": sorted(r.get("seed") for r in group), "lr": sorted({r.get("lr") for r in group} - {None}),
            "metrics": {name: _stat(_metric(r, name) for r in group) for name in METRICS},
        })
    return summary


def compare(summary, a: str, b: str, metric: str = "accuracy_after") -> dict:
    """Arm ``a`` minus arm ``b`` on ``metric``: both means and n, the difference of means, its standard error
    √(se_a² + se_b²) (None when either arm has a single value) and a verdict: "beyond 1 SE" (|difference| > SE),
    "within noise", or "single seed: no error bar". KeyError when an arm is absent or has no value of the metric."""
    arms = {entry["arm"]: entry["metrics"][metric] for entry in summary}
    sa, sb = arms[a], arms[b]
    if sa["mean"] is None or sb["mean"] is None:
        raise KeyError(f"no {metric} for {a if sa['mean'] is None else b}")
    diff = sa["mean"] - sb["mean"]
    se = None if sa["se"] is None or sb["se"] is None else math.hypot(sa["se"], sb["se"])
    verdict = "single seed: no error bar" if se is None else "beyond 1 SE" if abs(diff) > se else "within noise"
    return {"a": a, "b": b, "metric": metric, "mean_a": sa["mean"], "mean_b": sb["mean"], "n_a": sa["n"],
            "n_b": sb["n"], "diff": diff, "se": se, "verdict": verdict}


# --- formatting -----------------------------------------------------------------------------------------------------


def _num(value, sign: str = "") -> str:
    """3 significant digits (2.39e-05, 0.412, 12.3); 1000 and above as a grouped integer; n/a for None.
    ``sign="+"`` always writes the sign."""
    if value is None:
        return "n/a"
    return f"{value:{sign},.0f}" if abs(value) >= 1000 else f"{value:{sign}.3g}"


def _value(value, metric: str, sign: str = "") -> str:
    """A value of ``metric``: accuracies in % with one decimal, the rest via :func:`_num`."""
    if metric in PERCENT:
        return "n/a" if value is None else f"{100 * value:{sign}.1f}"
    return _num(value, sign)


def _pm(stat: dict, metric: str) -> str:
    """``mean ± SE`` of a statistic (only the mean when there is no SE)."""
    text = _value(stat["mean"], metric)
    return text if stat["se"] is None else f"{text} ± {_value(stat['se'], metric)}"


# --- markdown sections ----------------------------------------------------------------------------------------------


def _distinct(records, key) -> str:
    """The distinct non-null values of a field over the records, comma-separated."""
    values = sorted({str(r.get(key)) for r in records if r.get(key) is not None})
    return ", ".join(values) or "n/a"


def _header(folder: Path, records) -> str:
    """Title, run counts, machine, commits and the common settings (values that differ between runs listed)."""
    roles = _group(records, lambda r: r.get("role"))
    settings = defaultdict(set)
    for record in records:
        for key, value in (record.get("settings") or {}).items():
            settings[key].add(str(value))
    facts = [
        ["runs", f"{len(records)} ({', '.join(f'{len(g)} {role}' for role, g in roles.items())})"],
        ["machine", _distinct(records, "device")], ["commit", _distinct(records, "commit")],
    ]
    facts += [[key, ", ".join(sorted(values))] for key, values in settings.items()]
    suite = ", ".join(sorted({r["suite"] for r in records if r.get("suite")})) or folder.name
    return f"# RLVR benchmark: {suite}\n\n" + _table(["", ""], facts)


def _arm_row(entry: dict) -> list[str]:
    """The main-table row of one arm of :func:`summarize_arms`."""
    m = entry["metrics"]
    pm = {name: _pm(stat, name) for name, stat in m.items()}
    return [entry["arm"], str(entry["n"]), ", ".join(map(_num, entry["lr"])) or "n/a", pm["accuracy_after"],
            pm["accuracy_delta"], f"{_num(m['reward_first']['mean'])} → {_num(m['reward_last']['mean'])}",
            pm["step_time_s"], _num(m["peak_mem_mb"]["mean"]), _num(m["trainable_params"]["mean"]), pm["nss_mean"],
            pm["max_angle_mean"], pm["bf16_sparsity"],
            f"{_num(m['overlap_principal']['mean'])} / {_num(m['overlap_lowmag']['mean'])}", pm["leak"]]


def _main_table(summary) -> str:
    """One row per arm: seeds, lr and the metrics (mostly mean ± SE over seeds)."""
    rows = [_arm_row(entry) for entry in summary]
    header = ["arm", "seeds", "lr", "accuracy after (%)", "Δ accuracy (pp)", "reward first → last", "step time (s)",
              "peak mem (MB)", "trainable params", "NSS", "max angle (°)", "bf16 sparsity",
              "overlap principal / low-mag", "leak"]
    return ("Mean ± standard error over seeds (no ± with one seed). Accuracy: greedy, held-out prompts. Overlaps: "
            "random baseline 0.5.\n\n" + _table(header, rows))


def _sweep_table(records) -> str | None:
    """The learning-rate sweep: sweep runs plus the main runs of the swept arms at the sweep's seeds, grouped by arm
    and lr (means of the mean reward over all steps, reward_last and accuracy_after); None without sweep runs."""
    sweep = [r for r in records if r.get("role") == "sweep"]
    if not sweep:
        return None
    swept = _group(sweep, lambda r: r["arm"])
    chosen = [r for r in records if r.get("role") == "main" and r["arm"] in swept
              and r.get("seed") in {s.get("seed") for s in swept[r["arm"]]}]
    groups = _group(sweep + chosen, lambda r: (r["arm"], r.get("lr")))
    rows = [[arm, _distinct(group, "method"), _num(lr), str(len(group)),
             _num(_stat(_stat(r.get("reward_curve") or [])["mean"] for r in group)["mean"]),
             _num(_stat(r.get("reward_last") for r in group)["mean"]),
             _value(_stat(r.get("accuracy_after") for r in group)["mean"], "accuracy_after"),
             "yes" if any(r.get("role") == "main" for r in group) else ""]
            for (arm, lr), group in sorted(groups.items(), key=lambda i: (_arm_key(i[0][0]), i[0][1] or 0))]
    header = ["arm", "method", "lr", "runs", "mean reward (all steps)", "reward last fifth", "accuracy after (%)",
              "selected (main)"]
    return ("## Learning-rate sweep\n\nSeed 0; the rate with the highest mean training reward over all steps is "
            "selected (the held-out set plays no part in it).\n\n" + _table(header, rows))


def _comparison_line(summary, a: str, b: str, metric: str, ratio: bool = False) -> str | None:
    """One "Reading" line: both means (n), the difference ± SE and the verdict (and a / b when ``ratio``);
    None when an arm or the metric is missing."""
    try:
        c = compare(summary, a, b, metric)
    except KeyError:
        return None
    unit, diff_unit = ("%", " pp") if metric in PERCENT else ("", "")
    se = "" if c["se"] is None else f" ± {_value(c['se'], metric)}"
    extra = f", ratio {c['mean_a'] / c['mean_b']:.3g}" if ratio and c["mean_b"] else ""
    return (f"- {a} vs {b}, {METRICS[metric]}: {_value(c['mean_a'], metric)}{unit} (n={c['n_a']}) vs "
            f"{_value(c['mean_b'], metric)}{unit} (n={c['n_b']}){extra}; difference "
            f"{_value(c['diff'], metric, '+')}{se}{diff_unit}: {c['verdict']}.")


READING = [
    ("offprincipal", "lora", "accuracy_after", False), ("offprincipal", "full", "accuracy_after", False),
    ("pissa", "lora", "accuracy_after", False), ("sparse-principal", "sparse-safe", "accuracy_after", False),
    ("sparse-safe", "sparse-random", "accuracy_after", False), ("sft", "full", "nss_mean", False),
    ("sft", "full", "max_angle_mean", False), ("offprincipal", "lora", "step_time_s", True),
    ("offprincipal", "lora", "peak_mem_mb", True),
    # the arms at a fixed rate (benchmarks/rlvr.py Suite.fixed_lr): LoRA and PiSSA at OffPrincipal's rate
    ("offprincipal", "lora lr=0.0002", "accuracy_after", False), ("pissa lr=0.0002", "lora lr=0.0002", "accuracy_after", False),
]


def _reading(summary) -> str:
    """Pairwise comparisons of :data:`READING` whose arms are present, computed with :func:`compare`."""
    lines = [line for args in READING if (line := _comparison_line(summary, *args))]
    intro = ("Differences of means over seeds; the SE of a difference is √(se_a² + se_b²). \"beyond 1 SE\" is not "
             "a significance test.")
    return "## Reading\n\n" + intro + "\n\n" + ("\n".join(lines) or "No comparable pair of arms.")


# --- per-prompt outcomes: paired tests, strict scoring, the geometry question ------------------------------------

REFERENCE_ARMS = ("offprincipal", "lora")  # every arm with per-prompt outcomes is paired against these
GEOMETRY = ("offprincipal", "offprincipal-random")


def _outcomes_by_seed(records, arm: str, field: str = "correct_after") -> dict:
    """seed → the 0/1 outcomes ``field`` of the main run of ``arm`` at that seed (runs without them left out)."""
    return {r.get("seed"): r[field] for r in records if r.get("role") == "main" and r["arm"] == arm and r.get(field)}


def outcome_arm(records, arm: str) -> str:
    """``arm``, or the arm that re-ran it under a tag (``rlvr.py --arm offprincipal:tag=rerun`` → "offprincipal
    rerun") when only the re-run has per-prompt outcomes: the pairings then use the re-run."""
    if _outcomes_by_seed(records, arm):
        return arm
    reruns = sorted({r["arm"] for r in records if r["arm"].startswith(arm + " ") and _TAG.search(r["arm"])
                     and " " not in r["arm"][len(arm) + 1:] and _outcomes_by_seed(records, r["arm"])})
    return reruns[0] if reruns else arm


def _rerun_line(records, arm: str, rerun: str) -> str:
    """The accuracies of a re-run beside the original runs, seed by seed, with the commits that ran them."""
    def by_seed(name):
        return {r["seed"]: r for r in records if r.get("role") == "main" and r["arm"] == name}
    old, new = by_seed(arm), by_seed(rerun)
    seeds = sorted(set(old) & set(new))
    if not seeds:
        return ""
    pairs = ", ".join(f"seed {s}: {_value(old[s]['accuracy_after'], 'accuracy_after')} → "
                      f"{_value(new[s]['accuracy_after'], 'accuracy_after')}%" for s in seeds)
    commits = lambda runs: ", ".join(sorted({str(r.get("commit", "?"))[:7] for r in runs}))
    same = all(old[s].get("reward_curve") and old[s].get("reward_curve") == new[s].get("reward_curve")
               and old[s]["accuracy_after"] == new[s]["accuracy_after"] for s in seeds)
    return (f"The pairing uses **{rerun}**, {arm} run again at the same settings and seeds so that it has per-prompt "
            f"outcomes (its first records predate them). Held-out accuracy, first run → re-run: {pairs} (commits "
            f"{commits(old[s] for s in seeds)} → {commits(new[s] for s in seeds)})."
            + (" The re-run repeats the first runs exactly (the same reward at every step and the same held-out "
               "accuracy at every seed), so its per-prompt outcomes are theirs." if same else ""))


def paired(records, a: str, b: str):
    """Arm ``a`` minus arm ``b`` on held-out accuracy over the seeds both ran with per-prompt outcomes:
    (:func:`~offprincipal.experiment.stats.paired_bootstrap` estimate, McNemar p, seeds), or None."""
    xa, xb = _outcomes_by_seed(records, a), _outcomes_by_seed(records, b)
    seeds = sorted(s for s in set(xa) & set(xb) if len(xa[s]) == len(xb[s]))
    if not seeds:
        return None
    runs_a, runs_b = [xa[s] for s in seeds], [xb[s] for s in seeds]
    return paired_bootstrap(runs_a, runs_b), mcnemar_p(runs_a, runs_b), seeds


def _pp(est) -> str:
    return _ci(est, "accuracy_after")


def _paired_section(records, summary) -> str:
    arms = [e["arm"] for e in summary]
    with_outcomes = [arm for arm in arms if _outcomes_by_seed(records, arm)]
    references = [outcome_arm(records, ref) for ref in REFERENCE_ARMS]
    rows = []
    for arm in with_outcomes:
        base = _outcomes_by_seed(records, arm, "correct_before")
        if base:
            seeds = sorted(base)
            after = _outcomes_by_seed(records, arm)
            gain = paired_bootstrap([after[s] for s in seeds], [base[s] for s in seeds])
            rows.append([arm, "base model", ", ".join(map(str, seeds)), _pp(gain),
                         f"{mcnemar_p([after[s] for s in seeds], [base[s] for s in seeds]):.2g}"])
        # the references, and the other adapter at the same settings ("offprincipal lr=0.0001" − "lora lr=0.0001")
        settings = arm[len(_arm_method(arm)):]
        twin = "lora" + settings if _arm_method(arm) == "offprincipal" and settings else None
        for ref in [*references, *([twin] if twin in with_outcomes else [])]:
            if ref != arm and ref in with_outcomes and (result := paired(records, arm, ref)):
                est, p_value, seeds = result
                rows.append([arm, ref, ", ".join(map(str, seeds)), _pp(est), f"{p_value:.2g}"])
    without = [arm for arm in arms if arm not in with_outcomes]
    parts = ["## Paired tests over seeds × prompts",
             "Held-out accuracy of one arm minus another on the same prompts at the same seeds: the mean over seeds × "
             "prompts of the per-prompt difference, with a two-stage bootstrap interval (seeds, then prompts, "
             "resampled; 10,000 draws) and the exact McNemar p over the discordant (seed, prompt) pairs. Every arm "
             "with per-prompt outcomes is paired with the base model and with " + " and ".join(references) + ", and "
             "an offprincipal arm at other settings with the lora arm at the same settings."]
    parts.append(_table(["arm", "minus", "seeds", "difference (pp, 95% CI)", "McNemar p"], rows) if rows else
                 "No arm has per-prompt outcomes yet.")
    if without:
        parts.append(f"Without per-prompt outcomes (recorded before issue 18), so left out: {', '.join(without)}.")
    return "\n\n".join(parts)


def _strict_section(records, summary) -> str:
    rows = []
    for entry in summary:
        runs = [r for r in records if r.get("role") == "main" and r["arm"] == entry["arm"]
                and r.get("accuracy_strict_after") is not None]
        if runs:
            rows.append([entry["arm"], str(len(runs)),
                         _pm(_stat(r.get("accuracy_after") for r in runs), "accuracy_after"),
                         _pm(_stat(r.get("accuracy_strict_after") for r in runs), "accuracy_after"),
                         _pm(_stat(r.get("lenient_strict_disagree") for r in runs), "accuracy_after")])
    base = _stat(r.get("accuracy_strict_before") for r in records)
    parts = ["## Strict and lenient accuracy",
             "Lenient: the last number of the completion is the result (the training reward's rule). Strict: the "
             "completion states the result once, as `c` alone or as its final and only equation `a op b = c` (after "
             "any working), with nothing after it but punctuation "
             "(echoes, lists and repeated numbers score 0). Disagreement: the share of prompts scored right by one "
             "rule and wrong by the other. Mean ± SE over seeds."]
    if not rows:
        return "\n\n".join(parts + ["No record carries the strict score yet (records before issue 18 keep only the "
                                     "lenient one)."])
    if base["mean"] is not None:
        parts.append(f"Base model, strict: {_value(base['mean'], 'accuracy_after')}%.")
    header = ["arm", "seeds", "lenient accuracy (%)", "strict accuracy (%)", "lenient ≠ strict (% of prompts)"]
    return "\n\n".join(parts + [_table(header, rows)])


def _geometry_section(records, summary) -> str:
    """"Is it the geometry?": OffPrincipal against the same adapter with random bases, in plain words."""
    ours, control = GEOMETRY
    arms = {e["arm"] for e in summary}
    head = ["## Is it the geometry?",
            f"{ours} keeps the update off the top-k principal directions of each weight; {control} is the same "
            "adapter (same k, sides, init, rate) kept off a seeded random k-dimensional subspace. If blocking the "
            "principal directions is what helps, the first beats the second."]
    if control not in arms or ours not in arms:
        missing = ", ".join(arm for arm in GEOMETRY if arm not in arms)
        return "\n\n".join(head + [f"**Not yet run**: no records of {missing}. The planned runs are under "
                                    "\"Controls (issue 18)\" in the notes."])
    original, ours = ours, outcome_arm(records, ours)
    result = paired(records, ours, control)
    if ours != original:
        head.append(_rerun_line(records, original, ours))
    if result is not None:
        est, p_value, seeds = result
        how = (f"paired over {len(seeds)} seed(s) × {est.n // len(seeds)} prompts (two-stage bootstrap; "
               f"McNemar p = {p_value:.2g})")
    else:
        ours = original  # no pairing: the arm itself, over all its seeds
        est = _welch(records, ours, control, "accuracy_after")
        if est is None:
            return "\n\n".join(head + ["Fewer than 2 seeds on a side and no shared per-prompt outcomes: no interval "
                                        "yet."])
        how = ("Welch's interval over seeds, unpaired: the runs of one arm lack per-prompt outcomes (recorded before "
               "issue 18), so no pairing over prompts is possible")
    line = f"{ours} minus {control}, held-out accuracy: {_pp(est)} pp, {how}."
    if est.low > 0:
        verdict = ("**Yes, on this evidence: keeping updates off the principal directions beats keeping them off a "
                   "random subspace of the same size** (the interval excludes 0).")
    elif est.high < 0:
        verdict = "**No: the random subspace does better** (the interval lies below 0)."
    else:
        verdict = (f"**Not shown**: {ours} and {control} cannot be told apart (the interval covers 0), so the gain "
                   "cannot be credited to the principal geometry on this evidence.")
    parts = head + [line, verdict]
    against_lora = paired(records, control, "lora")
    if against_lora is None:
        welch = _welch(records, control, "lora", "accuracy_after")
        against_lora = None if welch is None else (welch, None, None)
    if against_lora is not None:
        parts.append(f"For scale, {control} minus lora: {_pp(against_lora[0])} pp"
                     + (" (paired)." if against_lora[1] is not None else " (Welch, unpaired)."))
    return "\n\n".join(parts)


# --- gain against forgetting -----------------------------------------------------------------------------------------

# (arm, other arm): does the first forget less than the second at the same gain?
FORGETTING_PAIRS = [("offprincipal", "lora"), ("offprincipal", "lora lr=0.001"), ("offprincipal", "full"),
                    ("offprincipal-full", "full")]


def _arm_method(arm: str) -> str:
    """The method of an arm name (``"lora lr=0.001"`` → ``lora``, ``"offprincipal k=8"`` → ``offprincipal``)."""
    return arm.split(" ")[0]


# the report names arms only as selections of the registry's methods
assert {_arm_method(a) for pair in FORGETTING_PAIRS for a in pair} | set(LAYER_ARMS) <= set(METHODS), "unknown arm"


def _has_retention(records) -> bool:
    return any(r.get("retention_nll_drift") is not None for r in records)


def _forgetting_table(summary) -> str:
    rows = [[e["arm"], str(e["n"]), _pm(e["metrics"]["accuracy_delta"], "accuracy_delta"),
             _pm(e["metrics"]["retention_nll_drift"], "retention_nll_drift"),
             _pm(e["metrics"]["retention_kl"], "retention_kl"),
             _pm(e["metrics"]["retention_task_delta"], "retention_task_delta")]
            for e in summary if e["metrics"]["retention_nll_drift"]["n"]]
    return _table(["arm", "seeds", "gain: Δ held-out accuracy (pp)", "forgetting: NLL drift (nats/token)",
                   "forgetting: KL to base (nats/token)", "forgetting: Δ retention task (pp)"], rows)


def _arm_values(records, arm: str, metric: str) -> list[float]:
    """The finite values of ``metric`` over the main runs of ``arm`` (one per seed)."""
    return _finite(_metric(r, metric) for r in records if r.get("role") == "main" and r["arm"] == arm)


def _welch(records, a: str, b: str, metric: str):
    """Welch's 95% interval of arm ``a`` minus arm ``b`` on ``metric`` over seeds (None with < 2 values a side)."""
    xs, ys = _arm_values(records, a, metric), _arm_values(records, b, metric)
    return welch_interval(xs, ys) if len(xs) > 1 and len(ys) > 1 else None


def _ci(est, metric: str) -> str:
    """``+d (95% CI lo to hi)`` of an Estimate, in the metric's unit."""
    return (f"{_value(est.value, metric, '+')} (95% CI {_value(est.low, metric, '+')} to "
            f"{_value(est.high, metric, '+')})")


def _covers_zero(est) -> bool:
    return est.low <= 0 <= est.high


def _forgetting_verdict(records, summary, a: str, b: str) -> str | None:
    """One plain sentence on arm ``a`` against ``b``: the gains and the forgetting figures as differences with Welch's
    95% intervals over seeds, and what they allow one to say."""
    try:
        gain = compare(summary, a, b, "accuracy_delta")
        drift = compare(summary, a, b, "retention_nll_drift")
    except KeyError:
        return None
    gain_ci, drift_ci = _welch(records, a, b, "accuracy_delta"), _welch(records, a, b, "retention_nll_drift")
    task_ci = _welch(records, a, b, "retention_task_delta")
    if gain_ci is None or drift_ci is None:
        return (f"- **{a} vs {b}** (n={gain['n_a']}/{gain['n_b']}): gain {_value(gain['diff'], 'accuracy_delta', '+')} "
                f"pp, NLL drift difference {_num(drift['diff'], '+')}. Fewer than 2 seeds on a side: no interval, so no "
                "verdict on forgetting.")
    text = (f"- **{a} vs {b}** (n={gain['n_a']}/{gain['n_b']}): gain {_ci(gain_ci, 'accuracy_delta')} pp; NLL drift "
            f"{_num(drift['mean_a'])} vs {_num(drift['mean_b'])}, difference {_num(drift_ci.value, '+')} (95% CI "
            f"{_num(drift_ci.low, '+')} to {_num(drift_ci.high, '+')})")
    if task_ci is not None:
        text += f"; retention task {_ci(task_ci, 'retention_task_delta')} pp"
    gains = (f"{a if gain_ci.value > 0 else b} gains more" if not _covers_zero(gain_ci)
             else "the gains are not distinguishable")
    forgetting = [ci for ci in (drift_ci, task_ci) if ci is not None]
    if all(_covers_zero(ci) for ci in forgetting):
        return text + (f". Verdict: {gains}; **no detectable difference in forgetting** (every forgetting "
                       "interval covers 0: these seeds cannot tell which forgets more).")
    worse = []
    if not _covers_zero(drift_ci):
        worse.append(f"{a if drift_ci.value > 0 else b} drifts more")
    if task_ci is not None and not _covers_zero(task_ci):
        worse.append(f"{b if task_ci.value > 0 else a} loses more on the retention task")
    return text + f". Verdict: {gains}; **{' and '.join(worse)}** (interval excludes 0)."


def _forgetting_section(records, summary, plots: Path) -> str | None:
    """Per arm, gain against forgetting; the scatter of every run; a plain reading of the pairs."""
    if not _has_retention(records):
        return None
    parts = ["## Gain against forgetting",
             "Gain: held-out accuracy after training minus the base model's. Forgetting: the NLL drift of the base "
             f"model's own greedy answers to {_distinct(records, 'retention_prompts')} general prompts (tuned minus "
             "base, nats per answer token; 0 = the "
             "base behaviour kept exactly; it goes below 0 when training sharpens the model towards its own greedy "
             "answers, as RL's falling entropy does), the KL divergence from the base to the tuned model on those "
             "answer positions where recorded (≥ 0, 0 only when unchanged), and the change of accuracy on a second "
             "task the runs do not train on. Mean ± SE over seeds in the table; the reading gives each difference "
             "with Welch's 95% interval over seeds.", _forgetting_table(summary)]
    scatter = _plot_gain_forgetting(records, plots / "gain_vs_forgetting.png")
    if scatter is not None:
        parts.append(f"![gain against forgetting]({PLOTS}/{scatter.name})")
    lines = [line for a, b in FORGETTING_PAIRS if (line := _forgetting_verdict(records, summary, a, b))]
    parts += ["### Reading", "\n".join(lines) or "No pair of arms with retention figures yet."]
    return "\n\n".join(parts)


def _plot_gain_forgetting(records, path: Path) -> Path | None:
    """One point per run of the comparison or the stability sweep: NLL drift (x) against the gain in held-out
    accuracy (y), coloured by arm."""
    points = [(r["arm"], r["retention_nll_drift"], _metric(r, "accuracy_delta")) for r in records
              if r.get("role") in ("main", "stability") and r.get("retention_nll_drift") is not None
              and _metric(r, "accuracy_delta") is not None]
    if not points:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for arm in sorted({p[0] for p in points}, key=_arm_key):
        xs, ys = zip(*[(x, 100 * y) for a, x, y in points if a == arm])
        ax.scatter(xs, ys, label=arm, s=40, alpha=0.8)
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.axvline(0, color="gray", linewidth=0.8)
    ax.set(title="gain against forgetting (one point per run)", xlabel="NLL drift of the base answers (nats/token)",
           ylabel="Δ held-out accuracy (pp)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


# --- stability sweep ------------------------------------------------------------------------------------------------


def stability_groups(records) -> dict[tuple[str, float], list[dict]]:
    """(method, lr) → runs, for the methods of the stability sweep (``role == "stability"`` records): their own runs
    and every other run of the same method at the same top-k (main and sweep runs; the top-k ablation excluded; a
    fixed-rate run that repeats a sweep run's method, rate and seed counted once; re-runs under a tag left out). In
    method order, then by rate;
    {} without stability records."""
    own = [r for r in records if r.get("role") == "stability"]
    if not own:
        return {}
    methods, top_k = {r["method"] for r in own}, {r.get("top_k") for r in own}
    unique = {}
    for r in records:
        if r["method"] in methods and r.get("top_k") in top_k and not _K_ARM.match(r["arm"]) and not _TAG.search(r["arm"]):
            unique.setdefault((r["method"], r.get("lr"), r.get("seed")), r)
    groups = _group(unique.values(), lambda r: (r["method"], r.get("lr")))
    return dict(sorted(groups.items(), key=lambda item: (_arm_key(item[0][0]), item[0][1] or 0)))


def run_outcome(record: dict) -> str:
    """"learned" when the base model's held-out accuracy lies below the run's 95% interval (Wilson, on the same
    prompts), "collapsed" when above it, "no clear change" otherwise or without an interval."""
    low, high = record.get("accuracy_after_ci95_low"), record.get("accuracy_after_ci95_high")
    before = record.get("accuracy_before")
    if None in (low, high, before):
        return "no clear change"
    return "learned" if before < low else "collapsed" if before > high else "no clear change"


def _tail_mean(curve, fraction: float = 0.25):
    values = _finite(curve or [])
    return _stat(values[-max(1, int(len(values) * fraction)):])["mean"] if values else None


def _median(values):
    xs = _finite(values)
    return statistics.median(xs) if xs else None


def _stability_table(groups) -> str:
    rows = []
    for (method, lr), runs in groups.items():
        runs = sorted(runs, key=lambda r: r.get("seed") or 0)
        outcomes = [run_outcome(r) for r in runs]
        rows.append([
            method, _num(lr), ", ".join(str(r.get("seed")) for r in runs),
            ", ".join(_value(r.get("accuracy_after"), "accuracy_after") for r in runs),
            _pm(_stat(_metric(r, "accuracy_delta") for r in runs), "accuracy_delta"),
            " / ".join(str(outcomes.count(o)) for o in ("learned", "no clear change", "collapsed")),
            _num(_stat(_tail_mean(r.get("reward_curve")) for r in runs)["mean"]),
            _pm(_stat(r.get("retention_nll_drift") for r in runs), "retention_nll_drift"),
            _num(_stat(r.get("update_rel_mean") for r in runs)["mean"]),
            _num(_median(_median(g for g in r.get("grad_norm_curve") or [] if g) for r in runs)),
        ])
    header = ["method", "lr", "seeds", "held-out accuracy per seed (%)", "gain (pp, mean ± SE)",
              "learned / no clear change / collapsed", "reward, last quarter", "NLL drift (nats/token)",
              "‖ΔW‖/‖W0‖ (mean over weights)",
              "grad norm (median over steps with a gradient)"]
    return _table(header, rows)


def _stability_reading(groups, records=()) -> str:
    """Per method: the rates where no run collapsed, where one did, and the rate of the highest mean gain; then
    OffPrincipal and LoRA each at that rate, compared."""
    lines, best = [], {}
    for method in dict.fromkeys(m for m, _ in groups):
        rates = {lr: runs for (m, lr), runs in groups.items() if m == method}
        stable = [lr for lr, runs in rates.items() if "collapsed" not in map(run_outcome, runs)]
        unstable = [lr for lr in rates if lr not in stable]
        best[method] = max(rates, key=lambda lr: _stat(_metric(r, "accuracy_delta") for r in rates[lr])["mean"] or -1)
        lines.append(f"- {method}: no run collapsed at {', '.join(map(_num, stable)) or 'no rate'}"
                     + (f"; at least one run collapsed at {', '.join(map(_num, unstable))}" if unstable else "")
                     + f"; highest mean gain at {_num(best[method])}.")
    if {"offprincipal", "lora"} <= set(best):
        lines.append(_best_rates_line(groups[("offprincipal", best["offprincipal"])], groups[("lora", best["lora"])],
                                      records))
    return "\n".join(line for line in lines if line)


def _outcomes_of_runs(runs: list[dict], records) -> tuple[dict, bool]:
    """seed → per-prompt outcomes of ``runs``, taken from a re-run under a tag (same method, rate, top-k and seed)
    where a run predates them; (outcomes, whether a re-run supplied any). Empty unless every run has them."""
    outcomes, from_rerun = {}, False
    for run in runs:
        if run.get("correct_after"):
            outcomes[run.get("seed")] = run["correct_after"]
            continue
        twin = next((r for r in records if _TAG.search(r["arm"]) and r.get("correct_after") and all(
            r.get(key) == run.get(key) for key in ("method", "lr", "top_k", "seed"))), None)
        if twin is None:
            return {}, False
        outcomes[run.get("seed")], from_rerun = twin["correct_after"], True
    return outcomes, from_rerun


def _runs_difference(a: list[dict], b: list[dict], records=()):
    """Held-out accuracy of runs ``a`` minus runs ``b``: paired over seeds × prompts (two-stage bootstrap) when both
    have per-prompt outcomes (their own, or their tagged re-run's) at shared seeds, else Welch over seeds;
    (estimate, how) or None."""
    (xa, rerun_a), (xb, rerun_b) = _outcomes_of_runs(a, records), _outcomes_of_runs(b, records)
    seeds = sorted(s for s in set(xa) & set(xb) if len(xa[s]) == len(xb[s]))
    if seeds:
        how = f"paired over seeds {seeds} × prompts" + (", outcomes of the re-run where a run predates them"
                                                         if rerun_a or rerun_b else "")
        return paired_bootstrap([xa[s] for s in seeds], [xb[s] for s in seeds]), how
    xs, ys = _finite(r.get("accuracy_after") for r in a), _finite(r.get("accuracy_after") for r in b)
    if len(xs) > 1 and len(ys) > 1:
        return welch_interval(xs, ys), "Welch over seeds, unpaired"
    return None


def _best_rates_line(ours: list[dict], lora: list[dict], records) -> str:
    """OffPrincipal at its best rate against LoRA at its best rate (each chosen on the held-out set itself)."""
    def arm(runs):
        return (f"{_num(runs[0].get('lr'))}: {_pm(_stat(r.get('accuracy_after') for r in runs), 'accuracy_after')}% "
                f"({len(runs)} seeds)")
    result = _runs_difference(ours, lora, records)
    difference = "" if result is None else f"; offprincipal minus lora {_ci(result[0], 'accuracy_after')} pp ({result[1]})"
    return (f"- **Each adapter at its best rate** of those tried: offprincipal at {arm(ours)}, lora at {arm(lora)}"
            f"{difference}. The best rates were picked on the held-out set itself, which flatters both alike.")


def _plot_stability(groups, path: Path) -> Path | None:
    """Gain and NLL drift against the learning rate (log scale): one point per run, a line through the means."""
    if not groups:
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (("accuracy_delta", "Δ held-out accuracy (pp)", 100), ("retention_nll_drift", "NLL drift (nats/token)", 1))
    for method in dict.fromkeys(m for m, _ in groups):
        rates = sorted(lr for m, lr in groups if m == method)
        for ax, (metric, label, scale) in zip(axes, panels):
            points = [(lr, scale * v) for lr in rates for r in groups[(method, lr)] if (v := _metric(r, metric)) is not None]
            if not points:
                continue
            dots = ax.scatter(*zip(*points), s=25, alpha=0.6)
            means = [(lr, scale * m) for lr in rates
                     if (m := _stat(_metric(r, metric) for r in groups[(method, lr)])["mean"]) is not None]
            ax.plot(*zip(*means), color=dots.get_facecolor()[0], label=method, marker="o")
            ax.set(xscale="log", xlabel="learning rate", ylabel=label)
    for ax, title in zip(axes, ("gain", "forgetting")):
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.set_title(f"{title} against the learning rate (one point per run)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return _save(fig, path)


def _stability_section(records, plots: Path) -> str | None:
    groups = stability_groups(records)
    if not groups:
        return None
    parts = ["## Stability sweep",
             "Each method of the sweep at each rate, with every run the suite has at that method, rate and top-k "
             "(seeds listed). A run *learned* when the base model's held-out accuracy lies below the run's 95% "
             "interval, *collapsed* when above it. Reward: mean training reward over the last quarter of the steps. "
             "‖ΔW‖/‖W0‖ and the grad-norm column are n/a for runs recorded before the harness kept them; steps whose "
             "completions all got the same reward have no gradient (zero advantage) and are left out of the median.",
             _stability_table(groups), _stability_reading(groups, records)]
    plot = _plot_stability(groups, plots / "stability.png")
    if plot is not None:
        parts.append(f"![stability]({PLOTS}/{plot.name})")
    return "\n\n".join(parts)


# --- plots ----------------------------------------------------------------------------------------------------------


def _save(fig, path: Path) -> Path:
    """Save a figure as PNG through a temporary sibling and a rename, then close it."""
    fig.tight_layout()
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        _pyplot().close(fig)
    return path


def _mean_curve(curves) -> list[float]:
    """Element-wise mean of lists of possibly different lengths (nulls skipped; NaN where nothing is left)."""
    length = max(map(len, curves))
    means = [_stat(c[i] for c in curves if i < len(c))["mean"] for i in range(length)]
    return [math.nan if m is None else m for m in means]


def _arm_curves(records, field: str, arms=None) -> dict[str, list[float]]:
    """Per arm (main runs, arm order, optionally only ``arms``) the seed-mean of a list-valued field."""
    main = [r for r in records if r.get("role") == "main" and r.get(field) and (arms is None or r["arm"] in arms)]
    groups = _group(main, lambda r: r["arm"])
    return {arm: _mean_curve([r[field] for r in groups[arm]]) for arm in sorted(groups, key=_arm_key)}


def _plot_reward_curves(records, path: Path) -> Path | None:
    """Moving mean (window 5) of the seed-averaged reward curve, one line per arm; None without curves."""
    curves = _arm_curves(records, "reward_curve")
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for arm, curve in curves.items():
        smooth = [_stat(curve[max(0, i - 4): i + 1])["mean"] for i in range(len(curve))]
        ax.plot(range(1, len(curve) + 1), [math.nan if v is None else v for v in smooth], label=arm)
    ax.set(title="training reward (moving mean, 5 steps; mean over seeds)", xlabel="step", ylabel="reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", ncol=2)
    return _save(fig, path)


def _plot_layers(records, field: str, path: Path, ylabel: str, log: bool) -> Path | None:
    """Seed-averaged per-layer values vs layer index (record order) for the arms of :data:`LAYER_ARMS`."""
    curves = _arm_curves(records, field, LAYER_ARMS)
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for arm, curve in curves.items():
        ax.plot(range(len(curve)), curve, marker=".", markersize=3, linewidth=0.8, label=arm)
    if log:
        ax.set_yscale("log")
    ax.set(title=f"{ylabel} per weight (mean over seeds)", xlabel="weight index (record order)", ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def _plot_accuracy(records, summary, path: Path) -> Path | None:
    """Bars of mean held-out accuracy after training per arm with SE error bars; a line at the mean accuracy
    before training. None when no arm has an accuracy."""
    arms = [e for e in summary if e["metrics"]["accuracy_after"]["mean"] is not None]
    if not arms:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(arms) + 2), 4.5))
    stats = [e["metrics"]["accuracy_after"] for e in arms]
    ax.bar([e["arm"] for e in arms], [100 * s["mean"] for s in stats],
           yerr=[100 * (s["se"] or 0) for s in stats], capsize=3, color="tab:blue")
    before = _stat(r.get("accuracy_before") for r in records if r.get("role") == "main")["mean"]
    if before is not None:
        ax.axhline(100 * before, color="gray", linestyle="--", label=f"before training ({100 * before:.1f}%)")
        ax.legend(fontsize="small")
    ax.set(title="held-out accuracy after training (mean ± SE)", ylabel="accuracy (%)")
    ax.tick_params(axis="x", labelrotation=45)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def _write_plots(records, summary, plots: Path) -> list[str]:
    """Write the PNGs that have data; their markdown image lines."""
    plots.mkdir(parents=True, exist_ok=True)
    made = [
        ("accuracy after training", _plot_accuracy(records, summary, plots / "accuracy.png")),
        ("reward curves", _plot_reward_curves(records, plots / "reward_curves.png")),
        ("NSS per weight", _plot_layers(records, "layer_nss", plots / "layer_nss.png", "NSS", log=True)),
        ("max angle per weight",
         _plot_layers(records, "layer_max_angle", plots / "layer_max_angle.png", "max angle (°)", log=False)),
    ]
    return [f"![{title}]({PLOTS}/{path.name})" for title, path in made if path is not None]


# --- the report -----------------------------------------------------------------------------------------------------


def write_report(folder) -> Path:
    """Write ``folder/report.md`` (atomically) and its PNGs under ``folder/plots`` from ``folder/records``;
    ``folder/notes.md``, if present, is appended under "## Notes". ValueError when there are no records."""
    folder = Path(folder)
    records = load_records(folder)
    if not records:
        raise ValueError(f"no records in {folder / 'records'}")
    summary = summarize_arms(records)
    parts = [_header(folder, records), "## Results", _main_table(summary), _geometry_section(records, summary),
             _paired_section(records, summary), _strict_section(records, summary),
             _forgetting_section(records, summary, folder / PLOTS), _stability_section(records, folder / PLOTS),
             _sweep_table(records), "## Plots",
             *_write_plots(records, summary, folder / PLOTS), _reading(summary)]
    notes = folder / "notes.md"
    if notes.is_file():
        parts += ["## Notes", notes.read_text().strip()]
    return write_text_atomic(folder / "report.md", "\n\n".join(p for p in parts if p) + "\n")


def main(argv=None) -> None:
    """``rlvr_report.py SUITE_FOLDER``: write the report and print its path."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="benchmarks/results/<suite> (holding records/)")
    print(write_report(parser.parse_args(argv).folder))


if __name__ == "__main__":
    main()
