"""benchmarks/gradient_energy.py: the energy fractions on planted gradients, and the script end to end on a tiny
Llama (no network)."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_tiny_model, make_tokenizer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("gradient_energy", ROOT / "benchmarks" / "gradient_energy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gradient_energy"] = module
    spec.loader.exec_module(module)
    return module


def bases(m=60, n=40, k=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, k, generator=gen)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=gen)).Q
    return U, V, gen


def test_gradient_inside_left_span(script):
    U, V, gen = bases()
    G = U @ torch.randn(U.shape[1], V.shape[0], generator=gen)  # every column in span(U)
    f = script.energy_fractions(G, U, V)
    assert f["e_left"] == pytest.approx(1.0, abs=1e-6)
    assert f["e_kept"] == pytest.approx(0.0, abs=1e-6)


def test_gradient_inside_right_span(script):
    U, V, gen = bases()
    G = torch.randn(U.shape[0], V.shape[1], generator=gen) @ V.T
    f = script.energy_fractions(G, U, V)
    assert f["e_right"] == pytest.approx(1.0, abs=1e-6)
    assert f["e_kept"] == pytest.approx(0.0, abs=1e-6)


def test_gradient_in_the_complement_is_kept(script):
    U, V, gen = bases()
    m, n = U.shape[0], V.shape[0]
    G = torch.randn(m, n, generator=gen, dtype=torch.float64)
    G = G - U.double() @ (U.double().T @ G)
    G = G - (G @ V.double()) @ V.double().T
    f = script.energy_fractions(G, U, V)
    assert f["e_kept"] == pytest.approx(1.0, abs=1e-9)
    assert f["e_left"] == pytest.approx(0.0, abs=1e-9)
    assert f["e_right"] == pytest.approx(0.0, abs=1e-9)


def test_random_gradient_matches_baselines(script):
    U, V, gen = bases(m=400, n=300, k=40)
    G = torch.randn(400, 300, generator=gen)
    f = script.energy_fractions(G, U, V)
    assert f["base_left"] == pytest.approx(40 / 400)
    assert f["base_right"] == pytest.approx(40 / 300)
    assert f["base_kept"] == pytest.approx((1 - 40 / 400) * (1 - 40 / 300))
    for side in ("left", "right", "kept"):
        assert f[f"e_{side}"] == pytest.approx(f[f"base_{side}"], rel=0.1)
    # the identity e_kept = 1 − e_left − e_right + ‖UᵀGV‖²/‖G‖²
    core = float((U.T.double() @ G.double() @ V.double()).norm() ** 2 / G.double().norm() ** 2)
    assert f["e_kept"] == pytest.approx(1 - f["e_left"] - f["e_right"] + core, abs=1e-6)  # fp32 bases


def test_zero_gradient_gives_nan(script):
    U, V, _ = bases()
    f = script.energy_fractions(torch.zeros(60, 40), U, V)
    assert all(math.isnan(f[key]) for key in ("e_left", "e_right", "e_kept"))


def test_lora_view_and_init(script):
    U, V, gen = bases()
    A = script.lora_a(4, 40, gen)
    assert A.shape == (4, 40) and float(A.abs().max()) <= 1 / math.sqrt(40)
    G = U @ torch.randn(U.shape[1], 40, generator=gen)
    assert script.left_fraction(G.double() @ A.T, U) == pytest.approx(1.0, abs=1e-6)


def _table_rows(text: str, heading: str) -> list[list[str]]:
    section = text.split(heading, 1)[1].split("\n\n")[1]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()[2:]]


def test_main_on_tiny_model(script, tmp_path, monkeypatch, one_thread):
    model_dir = tmp_path / "tiny"
    make_tiny_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    # a random tiny model never answers right: reward by completion length so that groups have differing rewards
    monkeypatch.setattr(script, "rewards", lambda task, completions, answers: [float(len(c) % 3) for c in completions])
    out = script.main(["--model", str(model_dir), "--top-k", "8", "--rank", "4", "--prompts", "2", "--group", "4",
                       "--max-new-tokens", "8", "--out", str(tmp_path / "report.md")])
    text = out.read_text()
    assert text.startswith("# Gradient energy on and off the principal subspaces (14 weights, k = 8)")
    for heading in ("## RL: GRPO policy gradient at step 0 — plain means", "## SFT: NLL of the reference answers — "
                    "parameter-weighted means"):
        rows = _table_rows(text, heading)
        assert [r[0] for r in rows] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                                        "**all**"]
        for r in rows:
            assert len(r) == 12
            values = [float(c.strip("*")) for i, c in enumerate(r) if i >= 3 and i != 9]  # column 9 is a ratio
            assert all(0.0 <= v <= 1.0 for v in values)
            assert float(r[9]) > 0
    assert "## Reading (computed from the numbers above by the script)" in text
    assert re.search(r"the projection removes \d+\.\d% of the energy", text)
    assert "n/a" not in text


def test_main_without_reward_signal_is_well_formed(script, tmp_path, one_thread):
    model_dir = tmp_path / "tiny"
    make_tiny_model("llama").save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    out = script.main(["--model", str(model_dir), "--top-k", "8", "--prompts", "1", "--group", "2",
                       "--max-new-tokens", "4", "--out", str(tmp_path / "report.md")])
    text = out.read_text()
    assert "0 of 1 groups had rewards that differ" in text
    assert "the GRPO gradient is zero" in text
    assert "## Reading" not in text  # no reading from undefined numbers
    sft = _table_rows(text, "## SFT: NLL of the reference answers — plain means")
    assert 0 < float(sft[-1][7].strip("*")) <= 1  # e_kept of the SFT gradient
