"""The quickstart's closing summary reads the report's tables correctly."""
from __future__ import annotations

import csv

from xatl_ds.quickstart import summary_lines


def _write(path, rows):
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_summary_lines(tmp_path):
    _write(tmp_path / "savings_summary.csv", [
        {"mixer": "mamba", "attention_layers": "none", "savings_flops_mean": "2.5", "any_lower_bound": "False"},
        {"mixer": "mamba", "attention_layers": "1", "savings_flops_mean": "7.0", "any_lower_bound": "True"},
        {"mixer": "retnet", "attention_layers": "none", "savings_flops_mean": "", "any_lower_bound": "False"},
    ])  # fmt: skip
    _write(tmp_path / "benchmark_deltas.csv", [
        {"mixer": "mamba", "attention_layers": "none", "task": "xatl_nextsent", "metric": "acc", "delta": "0.031"},
        {"mixer": "mamba", "attention_layers": "none", "task": "xatl_lastword", "metric": "perplexity", "delta": "-9"},
    ])  # fmt: skip
    s, d, where = summary_lines(tmp_path)
    assert s.endswith("mamba 2.50x; mamba+attn[1] >=7.00x; retnet not reached")
    assert d.endswith("mamba xatl_nextsent +0.031") and "perplexity" not in d
    assert where.endswith("report.md")
