"""``train.compile``: regional torch.compile of every block (xatl_ds.train.compile_blocks).

The CPU tests compile with the ``aot_eager`` backend (dynamo + AOTAutograd, no C++ codegen):
the wiring is what they check, quickly; inductor runs in benchmarks/gpu_check.py --compile."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import yaml

from conftest import REPO


def test_config_field():
    from xatl_ds.config import ConfigError, RunConfig, load_run_config

    assert RunConfig().train.compile is False
    assert load_run_config({"train": {"compile": True}}).train.compile is True
    with pytest.raises(ConfigError, match="train.compile"):
        load_run_config({"train": {"compile": "yes"}})
    with pytest.raises(ConfigError, match="train.compil"):
        load_run_config({"train": {"compil": True}})
    cfg = RunConfig()
    cfg.train.compile = 1  # set in code, not read from YAML: validate still refuses it
    with pytest.raises(ConfigError, match="must be true or false"):
        cfg.validate()


@pytest.mark.parametrize("mixer", ["attention", "mamba2"])
def test_compiled_blocks_match_eager(mixer):
    from xatl_ds.models import XatlConfig, XatlForCausalLM
    from xatl_ds.train import compile_blocks

    torch.manual_seed(0)
    cfg = XatlConfig(family="neox", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     mixer=mixer, mamba2_headdim=16, chunk_size=8, kernels="torch")  # fmt: skip
    eager = XatlForCausalLM(cfg)
    comp = XatlForCausalLM(cfg)
    comp.load_state_dict(eager.state_dict())
    names = [n for n, _ in comp.named_parameters()]
    assert compile_blocks(comp, backend="aot_eager") == 2
    assert [n for n, _ in comp.named_parameters()] == names  # in place: ZeRO and checkpoints see the same names
    assert all(blk._compiled_call_impl is not None for blk in comp.model.layers)
    ids = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    losses = []
    for m in (eager, comp):
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (n, a), b in zip(eager.named_parameters(), comp.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=n)


SPY = """
import sys
import xatl_ds.train as t
real = t.compile_blocks
def spy(model):
    n = real(model, backend="aot_eager")
    print("COMPILED", n, flush=True)
    return n
t.compile_blocks = spy
sys.exit(t.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_run_with_compile_trains(tmp_path, tiny_dataset):
    """A deepspeed run (ZeRO-2) with train.compile on: the blocks are compiled before the engine,
    it trains to the end, and its first loss is the uncompiled run's."""
    from xatl_ds.executor import train_env

    losses = {}
    for compile_ in (False, True):
        out = tmp_path / f"run{int(compile_)}"
        cfg = tmp_path / f"run{int(compile_)}.yaml"
        cfg.write_text(yaml.safe_dump(dict(
            name="compile", out_dir=str(out), seed=1, model={"size": "micro", "mixer": "retnet"},
            data={"path": str(tiny_dataset), "seq_len": 32, "batch_size": 4}, budget={"steps": 3},
            eval={"every": 3, "batches": 1}, checkpoint={"every": 100}, optim={"warmup_steps": 1},
            deepspeed={"config": "zero2.json"}, train={"compile": compile_},
        )))  # fmt: skip
        r = subprocess.run([sys.executable, "-c", SPY, "--config", str(cfg)], cwd=REPO, env=train_env(),
                           capture_output=True, text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        assert ("COMPILED 2" in r.stdout) == compile_, r.stdout[-2000:]  # micro: 2 blocks
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in rows] == [1, 2, 3] and (out / "DONE").is_file()
        assert json.loads((out / "meta.json").read_text())["compile"] is compile_
        losses[compile_] = rows[0]["train_loss"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
