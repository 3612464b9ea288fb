"""The repository layout as Python sees it (issue 11): ``kernels/`` is installed as ``offprincipal.kernels`` and is
harmless as a top-level ``kernels`` when the repo root is on sys.path (``python -m pytest``); every package of the
library is listed for installation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_top_level_kernels_folder_does_not_pass_for_hugging_faces_kernels():
    """With the repo root first on sys.path, transformers' probe for Hugging Face's ``kernels`` package finds our
    folder, imports it without side effects (no Triton, no kernel module) and reports it unavailable."""
    out = run("import sys, transformers.utils.import_utils as iu; print(iu.is_kernels_available(), "
              "'kernels' in sys.modules, 'kernels._tiles' in sys.modules, 'triton' in sys.modules)")
    assert out == "False True False False", out


def test_offprincipal_kernels_loads_its_exports_on_first_use():
    out = run("import offprincipal.kernels as k, sys; before = 'offprincipal.kernels.project' in sys.modules; "
              "f = k.project_; print(before, 'offprincipal.kernels.project' in sys.modules, callable(f))")
    assert out == "False True True"


def test_python_dash_m_pytest_collects_from_the_repo_root():
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_options.py"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]


def test_every_package_of_the_library_is_installed():
    """pyproject's explicit package list names every folder of offprincipal/ that holds Python modules."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"offprincipal." + str(p.parent.relative_to(ROOT / "offprincipal")).replace("/", ".")
               for p in (ROOT / "offprincipal").rglob("*.py") if p.parent != ROOT / "offprincipal"}
    assert folders | {"offprincipal", "offprincipal.kernels"} <= listed, sorted(folders - listed)
