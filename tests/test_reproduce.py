"""The scaling-law fit used by scripts/reproduce_matformer.py recovers known coefficients."""
import numpy as np
import pytest

from matlm.sweep.scaling import fit_scaling_law


@pytest.mark.parametrize("a, b, c", [(40.0, -0.08, 2.5), (2.0e3, -0.25, 3.1), (7.0, -0.05, 0.0)])
def test_fit_recovers_known_coefficients(a, b, c):
    n = np.array([1.4e6, 1.5e6, 1.7e6, 2.1e6, 4.0e6, 9.0e6])
    d = np.array([4e6, 4e6, 4e6, 4e6, 8e6, 8e6])
    loss = a * (n * d) ** b + c
    fit = fit_scaling_law(n, d, loss)
    np.testing.assert_allclose([fit.a, fit.b, fit.c], [a, b, c], rtol=1e-4, atol=1e-6)
    assert fit.rmse < 1e-8


def test_fit_under_noise_stays_close_and_needs_three_points():
    rng = np.random.default_rng(0)
    n = np.geomspace(1e6, 1e9, 12)
    d = np.full_like(n, 1e8)
    loss = 300.0 * (n * d) ** -0.12 + 1.8 + rng.normal(0, 1e-3, n.size)
    fit = fit_scaling_law(n, d, loss)
    assert abs(fit.b + 0.12) < 0.02 and abs(fit.c - 1.8) < 0.1
    assert fit.rmse < 2e-3
    with pytest.raises(ValueError, match="needs >= 3 distinct"):
        fit_scaling_law([1e6, 1e6, 2e6], [1e8] * 3, [3.0, 3.0, 2.9])
