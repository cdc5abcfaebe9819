"""Calibration of exit rules: Learn-then-Test certificates (CALM), per-exit temperature scaling, and FREE's
Beta-mixture threshold."""

from exitrl.calibration.beta_mixture import BetaFit, beta_mixture_threshold, fit_beta_moments
from exitrl.calibration.ltt import binomial_cdf, hoeffding_bentkus_pvalue, learn_then_test
from exitrl.calibration.temperature import TemperatureScaledPolicy, fit_temperatures

__all__ = [
    "BetaFit", "TemperatureScaledPolicy", "beta_mixture_threshold", "binomial_cdf", "fit_beta_moments",
    "fit_temperatures", "hoeffding_bentkus_pvalue", "learn_then_test",
]
