"""Distributed off-principal training on CPU: ``torchrun --nproc_per_node=2`` (gloo) runs tests/_fsdp_worker.py.

The worker checks, on both ranks: FSDP2 (fully_shard, DTensor Shard(0), uneven last shards 17/16 and 3/2 rows)
with OffPrincipalAdamW for every ``sides`` and with OffPrincipalOptimizer(SGD) equals single-process training
to 1e-6 and stays off-principal; DDP equals it too; bases come from rank 0 even where rank 1 holds zeros.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_two_rank_fsdp2_and_ddp_match_single_process(tmp_path):
    """Passes when both ranks finished every check (each writes a marker file at the very end); the launcher's
    own exit status is only reported, since its rendezvous teardown can fail on a loaded machine."""
    env = dict(os.environ, OMP_NUM_THREADS="1", FSDP_OK_DIR=str(tmp_path))
    env.pop("TRITON_INTERPRET", None)
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "tests" / "_fsdp_worker.py")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    done = sorted(p.name for p in tmp_path.glob("rank*.ok"))
    output = result.stdout + result.stderr
    assert done == ["rank0.ok", "rank1.ok"], f"torchrun exit {result.returncode}, finished: {done}\n{output[-8000:]}"
