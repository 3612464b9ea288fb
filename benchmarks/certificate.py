"""The base certificate on SmolLM2-135M-Instruct and random spectra: what it decides, and what it costs.

A basis that does not come from a fresh SVD of the live weight (a cache hit, a saved optimizer state, bases given
by the user) is checked with :func:`offprincipal.subspace.certify_subspace` instead of being recomputed: finite,
orthonormal, W·V = U·diag(S) and Uᵀ·W = diag(S)·Vᵀ (fp32 floor plus twice one rounding of a 16-bit weight), and
the top k, decided exactly (Cholesky of s²·I − R·Rᵀ, R = W − U·diag(S)·Vᵀ) against the tie tolerance
``CERTIFY_TIE_TOL`` for bases of the weight itself, and with the training allowance ``TRAINED_TOPK_TOL`` on top for
bases checked against weights that may have trained since (a saved state, ``subspaces=``).

For every weight (a deterministic subset with ``--every``) and for random spectra (Gaussian 512×384; a planted
spectrum with an exact tie at k), it records:

- false refusals: fresh fp32 SVDs, fresh SVDs of the bf16-rounded weight, and genuine resumes — W0 + ΔW with ΔW
  off-principal and ‖ΔW‖₂ = c·S_k, c ∈ {1e-3, 0.1, 0.5, 0.95}, in fp32 and in bf16 with fp32 master weights
  (stored round_bf16(W0 + ΔW)) — checked with the training allowance;
- false accepts on crafted bases: genuine singular pairs chosen wrongly (the k-th swapped for the (k+1)-th; the
  last 10, 20, 30 swapped for pairs k+1 …; Gaussian directions 65–96 as the top 32) and bases of another weight
  (the bf16 weight 0.5–6% away: a cache entry or user bases of a weight 1–6% away, a bf16 optimizer state of a model
  0.5–5% different). A crafted basis *must be refused* when its largest principal angle to the live weight's true
  top-k exceeds 0.1 rad and, for genuine pairs, its largest left-out singular value exceeds its smallest kept one
  by more than the path's tolerance (tie tolerance; tie tolerance + training allowance). Foreign bases are not
  pairs of the live weight: all of them with an angle above 0.1 must be refused;
- cost: the fp32 top-k SVD (``top_k_subspace``) and the certificate of its result, timed weight by weight,
  interleaved, ``--rounds`` times; sums of each weight's fastest time (target: certificate ≤ 10% of the SVD).

    python benchmarks/certificate.py --every 15     # every 15th weight (14 of 210, all 7 kinds), as committed
    python benchmarks/certificate.py                 # all 210 weights
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from offprincipal.files import write_text_atomic
from offprincipal.experiment.hardware import cpu_name
from offprincipal.optim.bases import TRAINED_TOPK_TOL
from offprincipal.subspace import (
    CERTIFY_PAIR_TOL, CERTIFY_ROUNDING_SIGMAS, CERTIFY_TIE_TOL, Subspace, SubspaceMismatch, certify_subspace,
    top_k_subspace,
)
from subspaces import linear_weights  # benchmarks/subspaces.py (this script's folder is on sys.path)

PATHS = {"fresh": CERTIFY_TIE_TOL, "trained": CERTIFY_TIE_TOL + TRAINED_TOPK_TOL}
"""The two tolerances of the top-k check: bases of the weight itself; bases of a weight that may have trained."""


def passes(W: torch.Tensor, sub: Subspace, path: str) -> bool:
    try:
        certify_subspace(W, sub, topk_tol=PATHS[path])
    except SubspaceMismatch:
        return False
    return True


def angle(A: torch.Tensor, B: torch.Tensor) -> float:
    """Largest principal angle (rad) between the column spans of A and B (orthonormal, same width)."""
    c = torch.linalg.svdvals(A.double().T @ B.double()).min().clamp(max=1.0)
    return float(torch.arccos(c))


def pick(U, S, Vh, idx) -> Subspace:
    idx = torch.tensor(idx)
    return Subspace(U[:, idx].contiguous(), S[idx].contiguous(), Vh[idx].T.contiguous())


def off_principal(shape, sub: Subspace, gen) -> torch.Tensor:
    """A random ΔW with UᵀΔW = 0 and ΔW·V = 0 and spectral norm 1."""
    D = torch.randn(shape, generator=gen, dtype=torch.float64)
    U, V = sub.U.double(), sub.V.double()
    D = D - U @ (U.T @ D)
    D = D - (D @ V) @ V.T
    return (D / float(torch.linalg.svdvals(D)[0])).float()


class Tally:
    """Counts per (case, path): tried, must-refuse, refused, false accepts, false refusals."""

    def __init__(self):
        self.rows: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def genuine(self, case, path, ok):
        row = self.rows[case, path]
        row["tried"] += 1
        row["false refusals"] += not ok

    def crafted(self, case, path, ok, must_refuse):
        row = self.rows[case, path]
        row["tried"] += 1
        row["must refuse"] += must_refuse
        row["refused"] += not ok
        row["false accepts"] += must_refuse and ok


def examine(label: str, W: torch.Tensor, k: int, gen, tally: Tally) -> None:
    """Every decision of the module docstring on one fp32 weight ``W``."""
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    top = pick(U, S, Vh, list(range(k)))
    for path in PATHS:
        tally.genuine(f"{label}: fresh fp32 SVD", path, passes(W, top, path))
    Wb = W.to(torch.bfloat16)
    Ub, Sb, Vhb = torch.linalg.svd(Wb.float(), full_matrices=False)
    top_b = pick(Ub, Sb, Vhb, list(range(k)))
    for path in PATHS:
        tally.genuine(f"{label}: fresh SVD of the bf16 weight", path, passes(Wb, top_b, path))
    D, Db = off_principal(W.shape, top, gen), off_principal(W.shape, top_b, gen)
    for c in (1e-3, 0.1, 0.5, 0.95):
        tally.genuine(f"{label}: fp32 resume, ‖ΔW‖₂ ≤ 0.95·S_k", "trained",
                      passes(W + c * float(top.S.min()) * D, top, "trained"))
        live = (Wb.float() + c * float(top_b.S.min()) * Db).to(torch.bfloat16)  # master weights: one rounding
        tally.genuine(f"{label}: bf16 resume (master weights), ‖ΔW‖₂ ≤ 0.95·S_k", "trained",
                      passes(live, top_b, "trained"))
    p = S.shape[0]
    choices = {"k-th pair swapped for the (k+1)-th": list(range(k - 1)) + [k]}
    for j in (10, 20, 30):
        if k + j <= p and j < k:
            choices[f"last {j} swapped for pairs k+1 …"] = list(range(k - j)) + list(range(k, k + j))
    if p >= 96 and k == 32:
        choices["directions 65–96 as the top 32"] = list(range(64, 96))
    for case, idx in choices.items():
        sub = pick(U, S, Vh, idx)
        left_out = max(float(S[i]) for i in range(p) if i not in idx)
        excess = left_out / float(sub.S.min()) - 1
        theta = max(angle(sub.U, top.U), angle(sub.V, top.V))
        for path, tol in PATHS.items():
            tally.crafted(f"{label}: {case}", path, passes(W, sub, path), theta > 0.1 and excess > tol)
    for away in (0.005, 0.01, 0.03, 0.06):
        other = (Wb.float() + away * float(Wb.float().std()) * torch.randn(W.shape, generator=gen)).to(torch.bfloat16)
        Uo, _, Vho = torch.linalg.svd(other.float(), full_matrices=False)
        theta = max(angle(top_b.U, Uo[:, :k]), angle(top_b.V, Vho[:k].T))
        for path in PATHS:  # the bf16 weight's bases checked against a bf16 weight `away` from it
            tally.crafted(f"{label}: bf16 bases of a weight 0.5–6% away", path, passes(other, top_b, path), theta > 0.1)


def timed(weights: dict, k: int, rounds: int):
    svd_t: dict[str, list[float]] = defaultdict(list)
    cert_t: dict[str, list[float]] = defaultdict(list)
    for _ in range(rounds):
        for name, W in weights.items():
            t0 = time.perf_counter()
            sub = top_k_subspace(W, k)
            t1 = time.perf_counter()
            certify_subspace(W, sub, name=name)  # raises if a fresh basis did not pass
            t2 = time.perf_counter()
            svd_t[name].append(t1 - t0)
            cert_t[name].append(t2 - t1)
    return svd_t, cert_t


def table(tally: Tally, prefix: str) -> list[str]:
    lines = ["| case | path | tried | must refuse | refused | **false accepts** | **false refusals** |",
             "|---|---|---|---|---|---|---|"]
    for (case, path), row in tally.rows.items():
        if not case.startswith(prefix):
            continue
        lines.append(f"| {case[len(prefix) + 2:]} | {path} | {row['tried']} | {row.get('must refuse', '–')} | "
                     f"{row.get('refused', '–')} | **{row.get('false accepts', 0)}** | **{row.get('false refusals', 0)}** |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--every", type=int, default=1, help="every N-th weight only (deterministic subset)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "certificate_smollm2_cpu.md"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from offprincipal.experiment.models import load_model

    model, _ = load_model()
    all_weights = linear_weights(model)
    weights = {name: W.float() for name, W in list(all_weights.items())[:: args.every]}
    load = os.getloadavg()[0]
    svd_t, cert_t = timed(weights, args.k, args.rounds)
    svd_min, cert_min = sum(map(min, svd_t.values())), sum(map(min, cert_t.values()))
    per_round = [(sum(t[r] for t in svd_t.values()), sum(t[r] for t in cert_t.values())) for r in range(args.rounds)]

    tally = Tally()
    gen = torch.Generator().manual_seed(0)
    for W in weights.values():
        examine("SmolLM2", W, args.k, gen, tally)
    for seed in range(2):
        g = torch.Generator().manual_seed(100 + seed)
        examine("Gaussian 512×384", torch.randn(512, 384, generator=g), args.k, gen, tally)
        # a planted spectrum with an exact tie σ_k = σ_{k+1}: any basis of the tied pair is top-k
        p = 384
        sigma = torch.linspace(3.0, 0.1, p, dtype=torch.float64)
        sigma[args.k] = sigma[args.k - 1]
        Q1 = torch.linalg.qr(torch.randn(512, p, generator=g, dtype=torch.float64)).Q
        Q2 = torch.linalg.qr(torch.randn(p, p, generator=g, dtype=torch.float64)).Q
        examine("planted, exact tie at k", ((Q1 * sigma) @ Q2.T).float(), args.k, gen, tally)

    totals = defaultdict(int)
    for row in tally.rows.values():
        for key in ("false accepts", "false refusals", "must refuse", "tried"):
            totals[key] += row.get(key, 0)
    n = len(weights)
    lines = [
        f"# Base certificate on SmolLM2-135M-Instruct ({n} weights, k = {args.k}) and random spectra",
        "",
        *([] if args.every == 1 else [f"Subset: every {args.every}th of the {len(all_weights)} weights in model order "
                                      "(all seven kinds: q, k, v, o, gate, up, down).", ""]),
        f"Machine: {cpu_name()} (2-core AMD EPYC VM, CPU only), {os.cpu_count()} cores, torch CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} torch thread(s), load average "
        f"{load:.1f} at start (shared with other jobs); torch {torch.__version__}, Python {platform.python_version()}. "
        "Weights as loaded by `offprincipal.experiment.models.load_model()` (fp32); bf16 cases round them.",
        "",
        f"Tolerances: tie tolerance `CERTIFY_TIE_TOL` = {CERTIFY_TIE_TOL:g} (path *fresh*: bases of the weight "
        f"itself); *trained* adds `TRAINED_TOPK_TOL` = {TRAINED_TOPK_TOL:g} (bases of a weight that may have trained "
        f"off-principal by ‖ΔW‖₂ ≤ S_k); pairs: {CERTIFY_PAIR_TOL:g}·‖S‖_F plus {CERTIFY_ROUNDING_SIGMAS:g}× the "
        "expected size of one rounding of a 16-bit weight.",
        "",
        f"**In all: {totals['false accepts']} false accepts among {totals['must refuse']} crafted bases that must be "
        f"refused; {totals['false refusals']} false refusals.**",
        "",
        "## Cost",
        "",
        f"Timed weight by weight, interleaved (SVD, certificate, next weight …), {args.rounds} rounds. Per round: "
        + "; ".join(f"SVD {s:.2f} s, certificate {c:.2f} s" for s, c in per_round) + ".",
        "",
        "| what | sum of per-weight fastest, s | ms / weight |",
        "|---|---|---|",
        f"| exact fp32 top-k SVD (`top_k_subspace`) | {svd_min:.2f} | {1000 * svd_min / n:.1f} |",
        f"| certificate of that basis (`certify_subspace`) | {cert_min:.2f} | {1000 * cert_min / n:.1f} |",
        f"| **certificate / SVD** | **{100 * cert_min / svd_min:.1f}%** | target ≤ 10% |",
        f"| certificate / SVD, median round | {100 * statistics.median(c / s for s, c in per_round):.1f}% | |",
        "",
        "## Decisions",
        "",
        "A crafted basis *must be refused* when its largest principal angle to the true top-k exceeds 0.1 rad and "
        "(genuine pairs) its largest left-out singular value exceeds its smallest kept one by more than the path's "
        "tolerance. Genuine cases have no *must refuse* column.",
        "",
    ]
    for prefix in ("SmolLM2", "Gaussian 512×384", "planted, exact tie at k"):
        count = {"SmolLM2": f"{n} weights", "Gaussian 512×384": "2 seeds", "planted, exact tie at k": "2 seeds"}[prefix]
        lines += [f"### {prefix} ({count})", "", *table(tally, prefix), ""]
    lines += [f"Reproduce: `python benchmarks/certificate.py{'' if args.every == 1 else f' --every {args.every}'}`."]
    write_text_atomic(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
