"""The MatFormer paper's scaling form, `loss = a * (N * D)^b + c` (N parameters, D tokens),
fitted by least squares (scipy.optimize.curve_fit; scipy comes with JAX)."""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class ScalingFit:
    a: float
    b: float
    c: float
    rmse: float   # Of the fitted losses against the points.
    points: int

    def predict(self, n_params, tokens):
        return self.a * (np.asarray(n_params, float) * np.asarray(tokens, float)) ** self.b + self.c


def fit_scaling_law(n_params: Sequence[float], tokens: Sequence[float],
                    losses: Sequence[float]) -> ScalingFit:
    """Fits a, b, c to the points (N_i, D_i, loss_i); needs >= 3 distinct N*D values.

    N*D spans many decades, so the fit runs in u = log(N*D) - mean: loss = A e^(b u) + c
    with A = a (N*D)_mean^b, which keeps the three parameters on similar scales (fitting a
    directly is ill-conditioned: a ~ 1e3 against b ~ -0.1). b < 0 (more compute, lower loss)."""
    from scipy.optimize import curve_fit
    x = np.asarray(n_params, float) * np.asarray(tokens, float)
    y = np.asarray(losses, float)
    if len(np.unique(x)) < 3:
        raise ValueError(f"the scaling fit needs >= 3 distinct N*D values, got {len(np.unique(x))}")
    u0 = float(np.mean(np.log(x)))
    u = np.log(x) - u0
    span = float(y.max() - y.min()) or 1.0
    c0 = float(y.min()) - 0.5 * span
    slope = np.polyfit(u, np.log(np.maximum(y - c0, 1e-9)), 1)[0]
    p0 = (float(np.exp(np.mean(np.log(np.maximum(y - c0, 1e-9))))), min(float(slope), -1e-3), c0)
    (big_a, b, c), _ = curve_fit(lambda u, A, b, c: A * np.exp(b * u) + c, u, y, p0=p0,
                                 bounds=([0.0, -10.0, -np.inf], [np.inf, 0.0, np.inf]),
                                 maxfev=20000, xtol=1e-14, ftol=1e-14, gtol=1e-14)
    a = big_a * math.exp(-b * u0)
    fit = ScalingFit(a=float(a), b=float(b), c=float(c), rmse=0.0, points=len(y))
    rmse = float(np.sqrt(np.mean((fit.predict(n_params, tokens) - y) ** 2)))
    return dataclasses.replace(fit, rmse=rmse)
