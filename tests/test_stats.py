"""The statistics of the reports (offprincipal/experiment/stats.py) on constructed outcomes."""

import numpy as np
import pytest

from offprincipal.experiment.stats import mcnemar_p, paired_bootstrap, t_quantile, welch_interval


@pytest.mark.parametrize("df, expected", [(1, 12.706205), (2, 4.302653), (10, 2.228139), (1e6, 1.959966)])
def test_t_quantile_matches_the_tables(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-5)


def test_welch_interval():
    # equal variances and sizes: df = 2(n−1), half-width t·√(2s²/n)
    xs, ys = [1.0, 2.0, 3.0], [0.0, 1.0, 2.0]
    est = welch_interval(xs, ys)
    assert est.value == pytest.approx(1.0)
    assert est.high - est.value == pytest.approx(t_quantile(0.975, 4) * np.sqrt(2 / 3))
    with pytest.raises(ValueError, match="at least 2"):
        welch_interval([1.0], [1.0, 2.0])


def constructed(rng, seeds, prompts, p_a, p_b):
    """Outcomes with prompt difficulty shared by both arms and every seed (what makes pairing matter)."""
    easy = rng.random(prompts)
    a = [(rng.random(prompts) < np.clip(easy + p_a - 0.5, 0, 1)).astype(int).tolist() for _ in range(seeds)]
    b = [(rng.random(prompts) < np.clip(easy + p_b - 0.5, 0, 1)).astype(int).tolist() for _ in range(seeds)]
    return a, b


def test_paired_bootstrap_recovers_a_known_effect():
    rng = np.random.default_rng(1)
    covered = 0
    for rep in range(40):
        a, b = constructed(rng, 3, 200, 0.6, 0.45)  # true effect +0.15
        est = paired_bootstrap(a, b, n_boot=1000, seed=rep)
        assert est.low > 0  # detected every time at this size
        covered += est.low <= 0.15 <= est.high
    assert covered >= 34  # ≈ 95% coverage (≥ 85% of 40 here)
    assert mcnemar_p(a, b) < 1e-3


def test_paired_bootstrap_without_effect_covers_zero():
    rng = np.random.default_rng(2)
    covered = 0
    for rep in range(40):
        a, b = constructed(rng, 2, 200, 0.4, 0.4)
        est = paired_bootstrap(a, b, n_boot=1000, seed=rep)
        covered += est.low <= 0 <= est.high
    assert covered >= 34
    same = [[1, 0, 1, 1], [0, 0, 1, 0]]
    est = paired_bootstrap(same, same)
    assert est.value == est.low == est.high == 0 and est.n == 8 and mcnemar_p(same, same) == 1.0
    swapped = [[1, 0], [0, 1]], [[0, 1], [1, 0]]  # exactly balanced discordant pairs
    assert paired_bootstrap(*swapped).value == 0 and paired_bootstrap(*swapped).low < 0 < paired_bootstrap(*swapped).high
    assert mcnemar_p(*swapped) == 1.0


def test_mcnemar_exact_value_and_shape_errors():
    a, b = [[1] * 8 + [0] * 2], [[0] * 8 + [0] * 2]  # 8 discordant pairs, all favouring a
    assert mcnemar_p(a, b) == pytest.approx(2 / 2**8)
    with pytest.raises(ValueError, match="same seeds and the same prompts"):
        paired_bootstrap([[1, 0]], [[1, 0, 1]])
