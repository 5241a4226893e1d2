"""The quickstart's closing summary reads the report's tables correctly: the effective-compute
multiplier as a point estimate with its method, never a `>=`; the paper's figure second."""
from __future__ import annotations

import csv

from xatl_ds.quickstart import summary_lines


def _write(path, rows):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_summary_lines(tmp_path):
    _write(tmp_path / "effective_summary.csv", [
        {"size": "tiny", "mixer": "mamba", "attention_layers": "none", "freeze_policy": "lit",
         "effective": "3.10x [2.50, 4.00] (extrapolated)", "effective_incl_source": "0.40x [0.32, 0.51] (extrapolated)"},
        {"size": "tiny", "mixer": "mamba", "attention_layers": "1", "freeze_policy": "lit",
         "effective": "2.20x (interpolated)", "effective_incl_source": "source FLOPs unknown (--source-flops)"},
        {"size": "tiny", "mixer": "retnet", "attention_layers": "none", "freeze_policy": "lit",
         "effective": "no estimate (1 upper bound)", "effective_incl_source": "no estimate (1 upper bound)"},
    ])  # fmt: skip
    _write(tmp_path / "savings_summary.csv", [
        {"size": "tiny", "mixer": "mamba", "attention_layers": "none", "freeze_policy": "lit",
         "paper_savings": "at least 14.33x (lower bound)"},
        {"size": "tiny", "mixer": "mamba", "attention_layers": "1", "freeze_policy": "lit", "paper_savings": "7.00x"},
    ])  # fmt: skip
    _write(tmp_path / "benchmark_deltas.csv", [
        {"size": "tiny", "mixer": "mamba", "attention_layers": "none", "freeze_policy": "lit", "task": "xatl_nextsent",
         "metric": "acc", "delta": "0.031"},
        {"size": "tiny", "mixer": "mamba", "attention_layers": "none", "freeze_policy": "lit", "task": "xatl_lastword",
         "metric": "perplexity", "delta": "-9"},
    ])  # fmt: skip
    eff, src, paper, d, where = summary_lines(tmp_path)
    assert eff.endswith("mamba 3.10x [2.50, 4.00] (extrapolated); mamba+attn[1] 2.20x (interpolated); "
                        "retnet no estimate (1 upper bound)")  # fmt: skip
    assert src.endswith("mamba 0.40x [0.32, 0.51] (extrapolated); mamba+attn[1] source FLOPs unknown (--source-flops); "
                        "retnet no estimate (1 upper bound)")  # fmt: skip
    assert "paper's definition" in paper and paper.endswith("mamba at least 14.33x (lower bound); mamba+attn[1] 7.00x")
    assert d.endswith("mamba xatl_nextsent +0.031") and "perplexity" not in d
    assert where.endswith("report.md")
    assert not any(">=" in line for line in (eff, src, paper, d, where))


def test_summary_labels_tell_sizes_and_variants_apart(tmp_path):
    _write(tmp_path / "effective_summary.csv", [
        {"size": s, "mixer": "mamba", "attention_layers": "none", "freeze_policy": fp, "effective": v,
         "effective_incl_source": v}
        for s, fp, v in (("mini", "lit", "1.50x (interpolated)"), ("mini", "none", "2.50x (interpolated)"),
                         ("tiny", "lit", "1.70x (interpolated)"))
    ])  # fmt: skip
    eff, *_ = summary_lines(tmp_path)
    assert eff.endswith("mini mamba (lit) 1.50x (interpolated); mini mamba (none) 2.50x (interpolated); "
                        "tiny mamba 1.70x (interpolated)")  # fmt: skip
