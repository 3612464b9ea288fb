"""Distributed off-principal training on CPU: ``torchrun --nproc_per_node=2`` (gloo) runs a worker script.

tests/_fsdp_worker.py (optimizers): FSDP2 (fully_shard, DTensor Shard(0), uneven last shards 17/16 and 3/2 rows)
with OffPrincipalAdamW for every ``sides`` and with OffPrincipalOptimizer(SGD) equals single-process training
to 1e-6 and stays off-principal; DDP equals it too; bases come from rank 0 even where rank 1 holds zeros.

tests/_fsdp_adapter_worker.py (adapter, TRL's fsdp2 recipe on a tiny Llama): rank 1 holds meta weights and gets
rank 0's bases (equal to one process's, fp32, cache on rank 0 only); accelerate's fsdp2_prepare_model shards it;
SGD-momentum training equals one process on the whole batch to 1e-6 relative on ΔW; AdamW equals one process on
the mean of the two half-batch gradients (factors bit for bit, ΔW to 1e-6); leak ≤ 1e-6; merge/unmerge exact;
TRL's FSDP2 weight sync sends W0 + ΔW and no adapter parameter; to_lora, save_as_lora, save_pretrained and merge_and_unload export ΔW;
FSDP1 per-leaf wrapping of the factors is refused. Its docstring lists every check.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]

needs_gloo = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)


def run_two_ranks(worker: str, tmp_path: Path) -> None:
    """Passes when both ranks finished every check (each writes a marker file at the very end); the launcher's
    own exit status is only reported, since its rendezvous teardown can fail on a loaded machine."""
    env = dict(os.environ, OMP_NUM_THREADS="1", FSDP_OK_DIR=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "tests" / worker)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    done = sorted(p.name for p in tmp_path.glob("rank*.ok"))
    output = result.stdout + result.stderr
    assert done == ["rank0.ok", "rank1.ok"], f"torchrun exit {result.returncode}, finished: {done}\n{output[-8000:]}"


@needs_gloo
def test_two_rank_fsdp2_and_ddp_match_single_process(tmp_path):
    run_two_ranks("_fsdp_worker.py", tmp_path)


@needs_gloo
def test_two_rank_fsdp2_adapter(tmp_path):
    pytest.importorskip("trl")  # the worker calls TRL's own FSDP2 weight sync
    run_two_ranks("_fsdp_adapter_worker.py", tmp_path)
