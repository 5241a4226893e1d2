"""Issue 20's analyses on synthetic curves with known answers, and its sweep files."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis.effective import effective_multiplier
from analysis.law import fit_law
from analysis.length import catch_up, length_summary, length_table, loglog_fit
from analysis.recipes_confirm import compare
from analysis.source_tokens import payback_conversions, plot_source_tokens, setting_label, source_summary, source_trend

E, A, ALPHA = 3.0, 4.0e3, 0.3  # scratch: L(C) = E + A * C^-alpha (C in FLOPs)
B = 8.0e11


def scratch_loss(c):
    return E + A * np.asarray(c, dtype=float) ** -ALPHA


def scratch_curve(c_max, every=B / 6):
    c = np.arange(every, c_max * (1 + 1e-9), every)
    return pd.DataFrame({"flops": c, "val_loss": scratch_loss(c), "tokens": c / 3.26e6})


def xatl_curve(multiplier, c_max, every=B / 12):
    """An XATL curve whose loss at FLOPs C is scratch's at multiplier(C) * C."""
    c = np.arange(every, c_max * (1 + 1e-9), every)
    return pd.DataFrame({"flops": c, "val_loss": scratch_loss(multiplier(c) * c), "tokens": c / 3.26e6})


# -- item 2: a known multiplier that decays with length --------------------------------------------
M0, BETA = 5.0, 0.35  # m(k) = M0 * k^-BETA with k = C / B


def decaying(c):
    return M0 * (np.asarray(c) / B) ** -BETA


def _pairs(n_seeds=3):
    return pd.DataFrame({"xatl_run": [f"x{s}" for s in range(n_seeds)], "scratch_run": [f"s{s}" for s in range(n_seeds)],
                         "size": "mini", "mixer": "mamba", "attention_layers": "none", "recipe": "random",
                         "freeze_policy": "lit", "seed": list(range(n_seeds))})  # fmt: skip


def _curves(scratch_max, n_seeds=3, noise=0.0):
    rng = np.random.default_rng(0)
    out = {}
    for s in range(n_seeds):
        sc, xc = scratch_curve(scratch_max), xatl_curve(decaying, 10 * B)
        if noise:
            sc["val_loss"] += rng.normal(0, noise, len(sc))
            xc["val_loss"] += rng.normal(0, noise, len(xc))
        out[f"s{s}"], out[f"x{s}"] = sc, xc
    return out


def test_length_recovers_a_decaying_multiplier_measured():
    table, ems = length_table(_pairs(), _curves(30 * B), {"mini": B}, fit_boot=20)
    assert set(table["length_factor"]) == {1.0, 3.0, 10.0}
    assert (table["method"] == "interpolated").all()
    for _, r in table.iterrows():
        truth = M0 * r["length_factor_actual"] ** -BETA  # at the evaluation actually used
        assert r["multiplier"] == pytest.approx(truth, rel=0.05)
        assert r["length_factor_actual"] <= r["length_factor"] + 1e-9
    summ = length_summary(table, ems, n_boot=200)
    for _, r in summ.iterrows():
        assert r["multiplier_mean"] == pytest.approx(M0 * r["length_factor"] ** -BETA, rel=0.05)
        assert r["multiplier_method"] == "interpolated"
    # does scratch catch up? the fitted trend reaches 1 at k* = M0^(1/BETA), past the data: extrapolated
    cu = catch_up(table).iloc[0]
    assert cu["trend_exponent"] == pytest.approx(-BETA, rel=0.05)
    assert cu["catch_up"] == "extrapolated"
    assert math.log(cu["catch_up_length_factor"]) == pytest.approx(math.log(M0) / BETA, rel=0.05)


def test_length_labels_what_scratch_does_not_reach():
    # scratch stops at 12 x B: the 10 x B point needs 10 * m(10) = 22 x B -> extrapolated, flagged
    table, ems = length_table(_pairs(1), _curves(12 * B, n_seeds=1), {"mini": B}, fit_boot=50)
    by = table.set_index("length_factor")
    assert by.loc[1.0, "method"] == "interpolated" and by.loc[3.0, "method"] == "interpolated"
    assert by.loc[10.0, "method"] == "extrapolated"
    assert by.loc[10.0, "multiplier"] == pytest.approx(M0 * by.loc[10.0, "length_factor_actual"] ** -BETA, rel=0.05)
    summ = length_summary(table, ems, n_boot=100).set_index("length_factor")
    assert summ.loc[10.0, "multiplier_method"] == "extrapolated"
    # a run too short for a length says so instead of reading an earlier point
    short = {"s0": scratch_curve(30 * B), "x0": xatl_curve(decaying, 2 * B)}
    t2, e2 = length_table(_pairs(1), short, {"mini": B}, fit_boot=10)
    assert list(t2.loc[t2["length_factor"] >= 3, "method"]) == ["not_reached", "not_reached"]
    assert e2[1] is None and e2[2] is None


def test_length_with_noise_and_seeds_keeps_the_truth_in_reach():
    table, ems = length_table(_pairs(), _curves(30 * B, noise=0.003), {"mini": B}, fit_boot=50)
    summ = length_summary(table, ems, n_boot=500)
    for _, r in summ.iterrows():
        assert r["multiplier_mean"] == pytest.approx(M0 * r["length_factor"] ** -BETA, rel=0.05)
    assert (table["loss_gap"] > 0).all()  # XATL below scratch at equal FLOPs while m > 1


# -- item 3: a known dependence on source tokens ---------------------------------------------------
def test_source_tokens_recovers_a_known_dependence_and_the_payback(tmp_path):
    c0, g = 2.0, 0.2  # m(T) = c0 * (T / 1e6)^g
    tokens = {"src10x": 2.5e6, "src30x": 7.6e6, "src100x": 25.4e6}
    sflops = {"src10x": 8e12, "src30x": 2.4e13, "src100x": 8e13}
    rows, ems = [], []
    for src, T in tokens.items():
        m = c0 * (T / 1e6) ** g
        for s in range(3):
            em = effective_multiplier(scratch_curve(12 * B), xatl_curve(lambda c, m=m: np.full_like(c, m), B),
                                      source_flops=sflops[src], n_boot=20)  # fmt: skip
            rows.append({"size": "mini", "mixer": "mamba", "attention_layers": "none", "recipe": "random",
                         "freeze_policy": "lit", "source": src, "seed": s, "source_tokens": T,
                         "source_flops": sflops[src], "budget": em.budget, "multiplier": em.multiplier,
                         "method": em.method})  # fmt: skip
            ems.append(em)
    table = pd.DataFrame(rows)
    assert (table["method"] == "interpolated").all()
    summ = source_summary(table, ems, train_tokens=4.5e6, n_boot=200)
    for _, r in summ.iterrows():
        truth = c0 * (r["source_tokens"] / 1e6) ** g
        assert r["multiplier_mean"] == pytest.approx(truth, rel=0.05)
        assert r["multiplier_incl_source_mean"] == pytest.approx(truth * r["xatl_flops"] / (r["xatl_flops"] + r["source_flops"]),
                                                                 rel=0.05)  # fmt: skip
        assert r["payback_conversions"] == pytest.approx(r["source_flops"] / ((truth - 1) * r["xatl_flops"]), rel=0.1)
        assert r["source_epochs"] == pytest.approx(r["source_tokens"] / 4.5e6)
    tr = source_trend(table).iloc[0]
    assert tr["exponent"] == pytest.approx(g, rel=0.05)
    assert set(setting_label(summ)) == {"mamba, random, freeze lit"}  # the figure's legend
    assert plot_source_tokens(summ, tmp_path / "f.png").stat().st_size > 0


def test_payback_conversions():
    assert payback_conversions(3.0, 1e12, 1e13) == pytest.approx(5.0)
    assert payback_conversions(1.0, 1e12, 1e13) == math.inf
    assert math.isnan(payback_conversions(float("nan"), 1e12, 1e13))


# -- item 5: a known power law -----------------------------------------------------------------------
def _law_rows(a, b, g, C, noise, seed=1):
    rng = np.random.default_rng(seed)
    rows = []
    # the studies' design: sizes at length 1 (source 10 x B), lengths at two sizes, sources at one size
    for N, D, T in ([(2.5e5, 2.5e5, 2.5e6), (9.7e5, 2.0e5, 2.2e6), (3.8e6, 1.2e5, 1.4e6)]
                    + [(N, D * k, T) for N, D, T in [(2.5e5, 2.5e5, 2.5e6), (9.7e5, 2.0e5, 2.2e6)] for k in (3, 10)]
                    + [(2.5e5, 2.5e5, T) for T in (7.6e6, 25.4e6)]):  # fmt: skip
        for s in range(3):
            m = C * N**a * D**b * T**g * math.exp(rng.normal(0, noise))
            rows.append({"n_params": N, "xatl_tokens": D, "source_tokens": T, "multiplier": m, "method": "interpolated",
                         "study": "synthetic"})  # fmt: skip
    return rows


def test_law_recovers_a_known_power_law_and_labels_extrapolation():
    a, b, g, C = 0.08, -0.3, 0.15, 0.9
    rows = _law_rows(a, b, g, C, noise=0.002)
    fit = fit_law(pd.DataFrame(rows))
    assert fit.exponents["n_params"] == pytest.approx(a, rel=0.05)
    assert fit.exponents["xatl_tokens"] == pytest.approx(b, rel=0.05)
    assert fit.exponents["source_tokens"] == pytest.approx(g, rel=0.05)
    assert fit.predict(n_params=1e6, xatl_tokens=2e5, source_tokens=5e6) == pytest.approx(
        C * 1e6**a * 2e5**b * 5e6**g, rel=0.05)  # fmt: skip
    assert len(fit.residuals) == len(rows) and abs(fit.residuals["log_residual"]).max() < 0.05
    assert fit.label(n_params=1e6, xatl_tokens=2e5, source_tokens=5e6) == "within the data"
    assert "n_params beyond the data" in fit.label(n_params=4e8, xatl_tokens=2e5, source_tokens=5e6)
    # a variable without spread is left out and named
    one = pd.DataFrame(rows).assign(source_tokens=2.5e6)
    assert "source_tokens" in fit_law(one).dropped
    with pytest.raises(ValueError):
        fit_law(pd.DataFrame(rows[:1]))
    # noisier points (5% per seed): the truth stays inside the 95% intervals
    noisy = fit_law(pd.DataFrame(_law_rows(a, b, g, C, noise=0.05, seed=3)))
    for t, v in (("n_params", a), ("xatl_tokens", b), ("source_tokens", g)):
        assert noisy.ci[t][0] <= v <= noisy.ci[t][1]


def test_loglog_fit_exact():
    f = loglog_fit([1, 3, 10], [5, 5 * 3**-0.5, 5 * 10**-0.5])
    assert f["b"] == pytest.approx(-0.5) and math.exp(f["a"]) == pytest.approx(5)


# -- item 4: paired verdicts on fresh seeds ----------------------------------------------------------
def _runs(size, recipe, losses, seeds):
    return [{"state": "done", "init_kind": "xatl", "size": size, "recipe": recipe, "seed": s, "final_val_loss": v,
             "flops": 8e11} for s, v in zip(seeds, losses)]  # fmt: skip


def test_recipes_confirm_verdicts():
    seeds = [100, 101, 102]
    fresh = pd.DataFrame(_runs("tiny", "random", [5.00, 5.10, 4.95], seeds)
                         + _runs("tiny", "attention+align+kl", [4.90, 5.01, 4.84], seeds)  # ~ -0.1 on every seed
                         + _runs("tiny", "zero_out", [5.05, 5.05, 4.95], seeds))  # fmt: skip
    orig = pd.DataFrame(_runs("tiny", "random", [5.0, 5.0, 5.0], [0, 1, 2])
                        + _runs("tiny", "attention+align+kl", [4.8, 4.8, 4.81], [0, 1, 2]))  # fmt: skip
    t = compare(fresh, orig).set_index("recipe")
    assert t.loc["align-kl", "verdict"] == "better" and t.loc["align-kl", "diff_high"] < 0
    assert t.loc["align-kl", "diff_vs_paper"] == pytest.approx(-0.1, abs=1e-9)
    assert t.loc["xatl-zero", "verdict"].startswith("no difference")
    assert t.loc["align-kl", "verdict_original"] == "better"


# -- the sweep files ---------------------------------------------------------------------------------
def test_issue20_sweeps_expand_with_the_planned_budgets():
    from xatl_ds.sweep import expand, load_sweep

    runs = {f: expand(load_sweep(f"sweeps/{f}.yaml")) for f in
            ("ladder_long", "savings_length", "source_tokens", "source_tokens_recipe", "recipes_confirm")}  # fmt: skip
    n = {f: len(r) for f, r in runs.items()}
    assert n == {"ladder_long": 57, "savings_length": 14, "source_tokens": 15, "source_tokens_recipe": 15,
                 "recipes_confirm": 57}  # fmt: skip

    def flops(r):
        return float(r.config.budget.flops)

    ll = runs["ladder_long"]
    for r in ll:
        if not r.is_source:
            B = {"mini": 8.0e11, "tiny": 1.91e12, "small": 3.67e12}[r.config.model.size]
            assert flops(r) == pytest.approx(B * (10 if r.init_kind == "scratch" else 1))
    for r in runs["savings_length"]:
        if not r.is_source:
            B = {"mini": 8.0e11, "tiny": 1.91e12}[r.config.model.size]
            assert flops(r) == pytest.approx(B * (30 if r.init_kind == "scratch" else 10))
    # the studies share their sources by key (the copy in analysis.studies.reuse_sources)
    keys = {f: {r.key for r in rs if r.is_source} for f, rs in runs.items()}
    assert keys["savings_length"] <= keys["ladder_long"] and keys["recipes_confirm"] == keys["ladder_long"]
    assert keys["source_tokens"] == keys["source_tokens_recipe"]
    assert len(keys["source_tokens"] & keys["ladder_long"]) == 1  # the 10 x B mini source
    src = {r.name: flops(r) for r in runs["source_tokens"] if r.is_source}
    assert src == {"source-mini": 8.0e12, "source-mini-30x": 2.4e13, "source-mini-100x": 8.0e13}
