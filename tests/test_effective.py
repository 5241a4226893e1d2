"""Effective compute and the size trend on synthetic curves with a known answer.

Scratch: L(C) = E + A*C^(-alpha) plus noise. XATL: at budget b it has exactly the loss scratch
reaches at m*b, so the effective-compute multiplier is m everywhere. Scratch runs either train
4x the XATL budget (the multiplier is interpolated) or as long as XATL (it is extrapolated).
"""
from __future__ import annotations

import math
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.effective import (
    METHODS, FitError, aggregate_over_seeds, effective_compute, effective_multiplier, fit_scratch_curve,
    percentile_interval,
)  # fmt: skip
from analysis.trend import size_trend, trend_table

E, A, ALPHA = 2.0, 1.0e4, 0.3  # a power law in raw FLOPs; L(1e15) ~ 2.03 + ...
B = 1.0e15  # XATL budget
M = 3.0  # true multiplier
NOISE = 0.002  # loss noise of a validation evaluation


def true_loss(c):
    return E + A * np.asarray(c, dtype=float) ** -ALPHA


def scratch_curve(length: float, seed: int, n: int = 41, noise: float = NOISE) -> pd.DataFrame:
    """A scratch run of ``length`` x B FLOPs, evaluated n times (step 0 at the loss of a uniform model)."""
    rng = np.random.default_rng(seed)
    c = np.linspace(0, length * B, n)
    loss = np.r_[10.0, true_loss(c[1:]) + rng.normal(0, noise, n - 1)]
    return pd.DataFrame({"flops": c, "val_loss": loss, "tokens": c / 1e6})


def xatl_curve(m: float = M, n: int = 51, end_loss: float | None = None) -> pd.DataFrame:
    c = np.linspace(0, B, n)
    loss = np.r_[10.0, true_loss(m * c[1:])]
    if end_loss is not None:
        loss[-1] = end_loss
    return pd.DataFrame({"flops": c, "val_loss": loss})


def test_fit_recovers_a_noise_free_power_law_and_inverts_it():
    c = np.r_[0, np.geomspace(1e13, 1e16, 30)]
    loss = np.r_[10.0, 10.0, true_loss(c[2:])]  # step 0 and a plateau at initialisation
    fit = fit_scratch_curve(c, loss, warmup_frac=0.0)
    assert fit.E == pytest.approx(E, rel=1e-4) and fit.alpha == pytest.approx(ALPHA, rel=1e-3)
    assert fit.A == pytest.approx(A, rel=1e-2) and fit.rmse < 1e-6
    assert fit.n_dropped == 2  # step 0 and the plateau point
    assert fit.inverse(true_loss(3e16)) == pytest.approx(3e16, rel=1e-3)
    assert fit.inverse(fit.E) == math.inf and fit.inverse(E - 0.5) == math.inf and math.isnan(fit.inverse(math.nan))
    assert fit.predict(fit.inverse(2.5)) == pytest.approx(2.5)
    # the default warmup rule leaves out C < 0.1 * C_max
    assert fit_scratch_curve(c, loss).flops.min() >= 0.1 * c.max()


def test_fit_refuses_curves_it_cannot_describe():
    with pytest.raises(FitError, match="usable point"):
        fit_scratch_curve([0, 1e14, 2e14, 3e14], [10, 3, 2.9, 2.8])
    with pytest.raises(FitError, match="usable point"):  # never falls: nothing after the plateau
        fit_scratch_curve(np.linspace(1e14, 1e15, 10), np.full(10, 3.0))
    with pytest.raises(ValueError, match="warmup_frac"):
        fit_scratch_curve([1, 2, 3, 4], [4, 3, 2, 1], warmup_frac=1.0)


@pytest.mark.parametrize("length, method", [(4.0, "interpolated"), (1.0, "extrapolated")])
def test_known_multiplier_is_recovered_with_the_right_flag(length, method):
    per_seed = [effective_multiplier(scratch_curve(length, s), xatl_curve(), source_flops=2 * B, seed=s)
                for s in range(3)]  # fmt: skip
    for r in per_seed:
        assert r.method == method and r.extrapolated == (method == "extrapolated")
        assert r.multiplier == pytest.approx(M, rel=0.05)
        assert r.multiplier_incl_source == pytest.approx(r.scratch_flops / (3 * B))
        if method == "extrapolated":
            assert r.extrapolation_factor > 2.5 and len(r.boot) > 150
            assert r.fit_ci_low < M < r.fit_ci_high  # the fit's own interval holds the truth
        else:
            assert len(r.boot) == 0 and math.isnan(r.fit_ci_low) and r.extrapolation_factor < 1
    agg = aggregate_over_seeds(per_seed)
    assert agg.mean == pytest.approx(M, rel=0.05) and agg.ci_low < M < agg.ci_high
    if method == "extrapolated":  # the seeds' interval widens by the fits' own uncertainty
        bare = aggregate_over_seeds([{"multiplier": r.multiplier, "method": "interpolated"} for r in per_seed])
        assert agg.ci_high - agg.ci_low > 1.5 * (bare.ci_high - bare.ci_low)
    assert agg.method == method and agg.n_used == 3 and agg.n_extrapolated == (3 if method == "extrapolated" else 0)
    src = aggregate_over_seeds(per_seed, incl_source=True)
    assert src.mean == pytest.approx(M / 3, rel=0.05) and src.ci_low < src.mean < src.ci_high


def test_multiplier_along_the_xatl_curve():
    df = effective_compute(scratch_curve(4.0, 0), xatl_curve())
    assert list(df.columns[:5]) == ["budget", "xatl_loss", "scratch_flops", "multiplier", "method"]
    assert len(df) == 50 and df["budget"].iloc[-1] == B and set(df["method"]) <= set(METHODS)
    assert df["multiplier_incl_source"].isna().all()  # no source_flops given
    # first budget: 3 * 0.02 B lies before scratch's first trained evaluation (0.1 B)
    assert df["method"].iloc[0] == "upper_bound"
    inter = df[df["method"] == "interpolated"]
    assert len(inter) >= 45 and np.median(inter["multiplier"]) == pytest.approx(M, rel=0.03)
    assert (inter["extrapolation_factor"] <= 1).all()
    # a short scratch run: the late budgets are extrapolated, the early ones still interpolated
    short = effective_compute(scratch_curve(1.0, 0), xatl_curve())
    assert short["method"].iloc[-1] == "extrapolated" and "interpolated" in set(short["method"])
    late = short[short["extrapolated"]]
    assert (late["budget"] * M > 0.99 * B).all() and late["multiplier"].between(0.9 * M, 1.1 * M).all()
    # explicit budgets use the loss known at the last evaluation at or before them
    two = effective_compute(scratch_curve(4.0, 0), xatl_curve(), budgets=[0.5 * B, 0.505 * B])
    assert two["xatl_loss"].iloc[0] == two["xatl_loss"].iloc[1] == pytest.approx(float(true_loss(M * 0.5 * B)))


def test_targets_below_the_asymptote_are_unreachable_and_never_averaged():
    fit = fit_scratch_curve(scratch_curve(1.0, 0)["flops"], scratch_curve(1.0, 0)["val_loss"])
    below = fit.E - 0.05
    r = effective_multiplier(scratch_curve(1.0, 0), xatl_curve(end_loss=below))
    assert r.method == "unreachable" and math.isnan(r.multiplier) and math.isnan(r.scratch_flops)
    rows = [r] + [effective_multiplier(scratch_curve(1.0, s), xatl_curve(), seed=s, n_boot=50) for s in (1, 2)]
    agg = aggregate_over_seeds(rows)
    assert agg.n_seeds == 3 and agg.n_used == 2 and agg.n_unreachable == 1
    assert agg.mean == pytest.approx(np.mean([rows[1].multiplier, rows[2].multiplier]))
    # a scratch curve too short to fit: extrapolation has no number either
    tiny = scratch_curve(1.0, 0, n=4)
    r = effective_multiplier(tiny, xatl_curve())
    assert r.method == "no_fit" and math.isnan(r.multiplier)
    assert aggregate_over_seeds([r]).method == "none"
    # one interpolated seed has no interval; rows may be plain mappings
    one = aggregate_over_seeds([{"multiplier": 2.0, "method": "interpolated"}])
    assert one.mean == 2.0 and math.isnan(one.ci_low) and not one.extrapolated
    with pytest.raises(ValueError, match="unknown method"):
        aggregate_over_seeds([{"multiplier": 2.0, "method": "guessed"}])


def test_bad_curves_and_budgets_are_clear_errors():
    with pytest.raises(ValueError, match="val_loss"):
        effective_compute(pd.DataFrame({"flops": [1.0]}), xatl_curve())
    with pytest.raises(ValueError, match="before the XATL curve's first evaluation"):
        effective_compute(scratch_curve(4.0, 0), xatl_curve().iloc[1:], budgets=[1e10])
    with pytest.raises(ValueError, match="budgets must be finite"):
        effective_compute(scratch_curve(4.0, 0), xatl_curve(), budgets=[0.0])


def test_percentile_interval_keeps_infinite_replicates():
    lo, hi = percentile_interval([1.0, 2.0, 3.0, math.inf, math.nan], level=0.5)
    assert lo == 1.0 and hi == math.inf
    assert all(math.isnan(v) for v in percentile_interval([1.0]))


def test_size_trend_recovers_a_known_exponent():
    rng = np.random.default_rng(0)
    sizes = [1.2e6, 4.7e6, 1.9e7, 8.5e7]  # non-embedding params of small models
    c, b_true = 0.1, 0.2
    per_size = [c * n**b_true * np.exp(rng.normal(0, 0.03, 3)) for n in sizes]
    per_size[0] = np.r_[per_size[0], math.nan]  # an unreachable seed is left out
    tr = size_trend(sizes[::-1], per_size[::-1])  # any order
    assert tr.sizes == tuple(sizes) and tr.n_seeds == (3, 3, 3, 3)
    assert tr.b == pytest.approx(b_true, rel=0.05) and tr.b_ci_low < b_true < tr.b_ci_high
    big = tr.extrapolate(1.0e9)  # ~ Pythia-1B: far outside the fitted sizes
    truth = c * 1.0e9**b_true
    assert big.extrapolated and big.multiplier == pytest.approx(truth, rel=0.1) and big.ci_low < truth < big.ci_high
    assert not tr.extrapolate(1.9e7).extrapolated
    with pytest.raises(ValueError, match="2 distinct sizes"):
        size_trend([1e6, 1e6], [[1.0, 1.1], [1.2]])
    with pytest.raises(ValueError, match="positive parameter count"):
        size_trend([0, 1e6], [[1.0], [1.2]])


def test_size_trend_from_measured_multipliers():
    """End to end: per size and seed, synthetic curves whose multiplier is m(N) = 0.1 * N^0.2,
    measured by effective_multiplier (interpolated), then fitted by size_trend."""
    sizes = [1.2e6, 4.7e6, 1.9e7, 8.5e7]
    per_size = []
    for k, n in enumerate(sizes):
        m = 0.1 * n**0.2  # 1.6 .. 3.9
        per_size.append([effective_multiplier(scratch_curve(5.0, 10 * k + s), xatl_curve(m)).multiplier
                         for s in range(3)])  # fmt: skip
    tr = size_trend(sizes, per_size)
    assert tr.b == pytest.approx(0.2, rel=0.05) and tr.b_ci_low < 0.2 < tr.b_ci_high


# -- the scipy numerics against the hand-written ones they replaced, on the committed results -----
#: the last commit with the hand-written fit (log grid + golden section), percentile bootstraps
#: and OLS; its modules are loaded from git and run on the same inputs as the current ones
_OLD_REV = "842678a"
_REPO = Path(__file__).resolve().parent.parent
_COMMITTED = [_REPO / "docs" / "results" / d for d in ("cpu_ladder", "cpu_ladder_pilot", "recipes")]


@pytest.fixture(scope="module")
def old_analysis():
    """analysis.savings / effective / trend as of ``_OLD_REV``, imported as a package of their
    own (``_old_analysis``); skipped where git or that commit is not available."""
    pkg = types.ModuleType("_old_analysis")
    pkg.__path__ = []
    mods = {}
    try:
        for name in ("savings", "effective", "trend"):
            src = subprocess.run(["git", "show", f"{_OLD_REV}:analysis/{name}.py"], cwd=_REPO, capture_output=True,
                                 text=True, check=True).stdout  # fmt: skip
            sys.modules.setdefault("_old_analysis", pkg)
            mods[name] = sys.modules[f"_old_analysis.{name}"] = types.ModuleType(f"_old_analysis.{name}")
            mods[name].__package__ = "_old_analysis"
            exec(compile(src, f"{_OLD_REV}:analysis/{name}.py", "exec"), mods[name].__dict__)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"the old analysis code is not available from git ({e})")
    yield mods
    for name in list(sys.modules):
        if name == "_old_analysis" or name.startswith("_old_analysis."):
            del sys.modules[name]


def _committed_curves(root: Path):
    """Per pairing of a committed report: the XATL curve (its running minimum at every
    evaluation, effective_curves.csv) and points of the scratch curve's running minimum
    (savings_curves.csv's scratch FLOPs at each target loss and effective_curves.csv's
    interpolated rows): the raw curves are not committed, these are the curves that are."""
    ec, sc = pd.read_csv(root / "effective_curves.csv"), pd.read_csv(root / "savings_curves.csv")
    for (xr, sr), g in ec.groupby(["xatl_run", "scratch_run"]):
        s1 = sc[(sc["xatl_run"] == xr) & (sc["scratch_run"] == sr)][["scratch", "target"]]
        s2 = g.loc[g["method"] == "interpolated", ["scratch_flops", "xatl_loss"]]
        scratch = pd.concat([s1.set_axis(["flops", "val_loss"], axis=1), s2.set_axis(["flops", "val_loss"], axis=1)])
        xatl = pd.DataFrame({"flops": g["budget"].to_numpy(), "val_loss": g["xatl_loss"].to_numpy()})
        yield xatl, scratch.dropna().sort_values("flops"), float(g["source_flops"].iloc[0])


@pytest.mark.parametrize("root", _COMMITTED, ids=lambda p: p.name)
def test_scipy_fit_matches_the_old_fit_on_committed_curves(old_analysis, root):
    """The scipy fit (minimize_scalar on the profiled alpha) against the old grid + golden
    section: parameters within 1e-5 relative (measured: <= 4e-7), multipliers within 1e-6
    (measured: <= 8e-8) and their fit intervals within 1e-5 (measured: <= 4e-7); the methods
    identical. The new fit's residuals are never larger than the old one's by more than 1e-9."""
    old = old_analysis["effective"]
    olds, news = [], []
    for xatl, scratch, src in _committed_curves(root):
        fo, fn = old.fit_scratch_curve(xatl["flops"], xatl["val_loss"]), fit_scratch_curve(xatl["flops"], xatl["val_loss"])
        for k in ("E", "A", "alpha"):
            assert getattr(fn, k) == pytest.approx(getattr(fo, k), rel=1e-5, abs=1e-9), k
        assert fn.rmse <= fo.rmse * (1 + 1e-9)
        mo = old.effective_multiplier(scratch, xatl, source_flops=src, n_boot=40, seed=3)
        mn = effective_multiplier(scratch, xatl, source_flops=src, n_boot=40, seed=3)
        assert mn.method == mo.method
        for k in ("multiplier", "multiplier_incl_source", "scratch_flops"):
            assert getattr(mn, k) == pytest.approx(getattr(mo, k), rel=1e-6, nan_ok=True), k
        assert (mn.fit_ci_low, mn.fit_ci_high) == pytest.approx((mo.fit_ci_low, mo.fit_ci_high), rel=1e-5, nan_ok=True)
        olds.append(mo)
        news.append(mn)
    assert len(news) >= 24 and any(m.method == "extrapolated" for m in news)
    # the over-seeds aggregate is the same code on both sides: it sees the same replicates
    ao, an = old.aggregate_over_seeds(olds, n_boot=500), aggregate_over_seeds(news, n_boot=500)
    assert (an.mean, an.ci_low, an.ci_high) == pytest.approx((ao.mean, ao.ci_low, ao.ci_high), rel=1e-5)


@pytest.mark.parametrize("root", _COMMITTED, ids=lambda p: p.name)
def test_scipy_bootstraps_and_regression_match_the_old_ones_on_committed_tables(old_analysis, root):
    """savings_summary from savings.csv: scipy.stats.bootstrap draws the same resamples from
    the same seed and takes the same linear quantile, so every mean and interval agrees to
    1e-12. The size trend from effective.csv: linregress gives the same a, b and fitted
    multipliers to 1e-12; the stratified bootstrap draws the same replicates where every size has
    two or more seeds, and the interval of b moves only by reading a linearly interpolated quantile
    instead of the neighbouring order statistic (measured: <= 4e-4 in b, <= 5e-4 relative in the
    multiplier's interval; allowed: 2e-3)."""
    from analysis.report import TREND_KEYS
    from analysis.savings import aggregate_savings

    sav = pd.read_csv(root / "savings.csv")
    so, sn = old_analysis["savings"].aggregate_savings(sav), aggregate_savings(sav)
    cols = [c for c in so if c.endswith(("_mean", "_ci_low", "_ci_high"))]
    np.testing.assert_allclose(sn[cols].to_numpy(float), so[cols].to_numpy(float), rtol=1e-12, atol=1e-12)

    eff = pd.read_csv(root / "effective.csv")
    eff = eff[eff["xatl_state"] == "done"]
    (to, tro, _), (tn, trn, _) = old_analysis["trend"].trend_table(eff, TREND_KEYS), trend_table(eff, TREND_KEYS)
    assert len(tn) == len(to) > 0 and trn.keys() == tro.keys()
    for c in ("multiplier", "b"):
        np.testing.assert_allclose(tn[c].to_numpy(float), to[c].to_numpy(float), rtol=1e-12)
    for c in ("b_ci_low", "b_ci_high"):
        np.testing.assert_allclose(tn[c].to_numpy(float), to[c].to_numpy(float), atol=2e-3)
    for c in ("ci_low", "ci_high"):
        np.testing.assert_allclose(tn[c].to_numpy(float), to[c].to_numpy(float), rtol=2e-3)
    for key, new in trn.items():
        old = tro[key]
        if min(old.n_seeds) > 1:  # the same replicates; each end of b's interval between two order statistics
            np.testing.assert_allclose(new.boot, old.boot, rtol=1e-9, atol=1e-12)
            s, a, eps = np.sort(old.boot[:, 1]), 0.025 * (len(old.boot) - 1), 1e-12  # eps: rounding of the OLS
            assert s[math.floor(a)] - eps <= new.b_ci_low <= s[math.ceil(a)] + eps
            assert s[math.floor(len(s) - 1 - a)] - eps <= new.b_ci_high <= s[math.ceil(len(s) - 1 - a)] + eps
