"""Cost of the base certificate against the exact SVD it replaces, on SmolLM2-135M-Instruct (all 210 weights).

A basis that does not come from a fresh SVD of the live weight (a cache hit, a saved optimizer state, bases
given by the user) is checked with :func:`offprincipal.subspace.certify_subspace` instead of being recomputed:
finite, orthonormal, W·V = U·diag(S) and Uᵀ·W = diag(S)·Vᵀ, and the top k by block power iterations on the
residual. This script times, weight by weight and interleaved (SVD, certificate, SVD, certificate …, so a change
of machine load hits both alike), the exact fp32 top-k SVD (``top_k_subspace(W, k)``) and the certificate of its
result, ``--rounds`` times each, and reports the sums over the weights of each one's fastest time (the
minimum removes the interference of other jobs on a shared machine; the medians over rounds are reported too)
and their ratio (target ≤ 10%).

It also records what the certificate decides on the real weights: every fresh basis passes; the bases of
another layer's weight of the same shape (a foreign state) and the bottom-k singular pairs of the weight
itself (minor directions) fail.

    python benchmarks/certificate.py                 # writes benchmarks/results/certificate_smollm2_cpu.md
    python benchmarks/certificate.py --threads 1 --rounds 3
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from offprincipal.files import write_text_atomic
from offprincipal.hardware import cpu_name
from offprincipal.subspace import Subspace, SubspaceMismatch, certify_subspace, top_k_subspace
from subspaces import linear_weights  # benchmarks/subspaces.py (this script's folder is on sys.path)


def rejected(W: torch.Tensor, sub: Subspace) -> bool:
    try:
        certify_subspace(W, sub)
    except SubspaceMismatch:
        return True
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "certificate_smollm2_cpu.md"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from offprincipal.models import load_model

    model, _ = load_model()
    weights = linear_weights(model)
    load = __import__("os").getloadavg()[0]
    svd_times: dict[str, list[float]] = {name: [] for name in weights}
    cert_times: dict[str, list[float]] = {name: [] for name in weights}
    subs: dict[str, Subspace] = {}
    for _ in range(args.rounds):
        for name, W in weights.items():
            t0 = time.perf_counter()
            sub = top_k_subspace(W, args.k)
            t1 = time.perf_counter()
            certify_subspace(W, sub, name=name)  # raises if a fresh basis did not pass
            t2 = time.perf_counter()
            svd_times[name].append(t1 - t0)
            cert_times[name].append(t2 - t1)
            subs[name] = sub
    svd_totals = [sum(t[r] for t in svd_times.values()) for r in range(args.rounds)]
    cert_totals = [sum(t[r] for t in cert_times.values()) for r in range(args.rounds)]
    svd_min, cert_min = sum(map(min, svd_times.values())), sum(map(min, cert_times.values()))
    svd_med, cert_med = statistics.median(svd_totals), statistics.median(cert_totals)

    by_shape: dict[tuple, list[str]] = {}
    for name, W in weights.items():
        by_shape.setdefault(tuple(W.shape), []).append(name)
    foreign_caught = minor_caught = 0
    for names in by_shape.values():
        for i, name in enumerate(names):
            other = names[(i + 1) % len(names)]
            foreign_caught += rejected(weights[name], subs[other])
    for name, W in weights.items():
        U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
        minor_caught += rejected(W, Subspace(U[:, -args.k:].contiguous(), S[-args.k:].contiguous(),
                                             Vh[-args.k:].T.contiguous()))

    n = len(weights)
    lines = [
        f"# Base certificate vs exact SVD on SmolLM2-135M-Instruct ({n} weights, k = {args.k})",
        "",
        f"Machine: {cpu_name()}, {__import__('os').cpu_count()} cores, torch CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} torch thread(s), load average "
        f"{load:.1f} at start (a machine shared with other jobs); torch {torch.__version__}, Python "
        f"{platform.python_version()}. Weights fp32, as loaded by `offprincipal.models.load_model()`.",
        "",
        f"Timed weight by weight, interleaved (SVD, certificate, next weight …), {args.rounds} rounds. "
        f"Per round: SVD {', '.join(f'{s:.2f}' for s in svd_totals)} s; certificate "
        f"{', '.join(f'{s:.2f}' for s in cert_totals)} s.",
        "",
        "| what | sum of per-weight fastest, s | ms / weight | median round, s |",
        "|---|---|---|---|",
        f"| exact fp32 top-k SVD (`top_k_subspace`) | {svd_min:.2f} | {1000 * svd_min / n:.1f} | {svd_med:.2f} |",
        f"| certificate of that basis (`certify_subspace`) | {cert_min:.2f} | {1000 * cert_min / n:.1f} | {cert_med:.2f} |",
        f"| **certificate / SVD** | **{100 * cert_min / svd_min:.1f}%** | target ≤ 10% | {100 * cert_med / svd_med:.1f}% |",
        "",
        "What it decided on the real weights:",
        "",
        f"- fresh bases: {n} / {n} pass;",
        f"- bases of another layer's weight of the same shape (a foreign state): {foreign_caught} / {n} refused;",
        f"- the weight's own bottom-{args.k} singular pairs (minor directions): {minor_caught} / {n} refused.",
        "",
        "Reproduce: `python benchmarks/certificate.py`.",
    ]
    write_text_atomic(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
