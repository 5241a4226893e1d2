"""Freeze policies and the LIT controller on synthetic loss / norm sequences."""
from __future__ import annotations

import json

import pytest

from xatl_ds.freeze import (
    NEVER,
    TRAINABLE,
    FreezeConfig,
    FreezeController,
    format_unfreeze_order,
    freeze_config_fields,
    param_stage_map,
    parse_unfreeze_order,
    resolve_stages,
)

PRESENT = {"embed", "lm_head", "final_norm", "norms", "mlp", "attn_out"}


def feed(ctrl: FreezeController, losses, start: int = 0, norms=None):
    """Feed one loss per step; return the events with the step that produced them."""
    out = []
    for i, loss in enumerate(losses):
        s = start + i
        for ev in ctrl.update(s, loss, None if norms is None else norms[i]):
            out.append(ev)
    return out


def windows(*means, w):
    """A loss sequence of constant windows (each mean repeated w times)."""
    return [m for m in means for _ in range(w)]


# --------------------------------------------------------------------------- LIT
def test_lit_exact_trigger_step_and_numbers():
    cfg = FreezeConfig(policy="lit", window=3, threshold=0.1, patience=1, rewarmup_steps=0)
    ctrl = FreezeController(cfg, PRESENT)
    # windows: steps 0-2 mean 10, 3-5 mean 8 (r=0.2 ok), 6-8 mean 7.5 (r=0.0625 < 0.1)
    losses = [11, 10, 9] + [8, 8, 8] + [7.5, 7.0, 8.0] + [7.0] * 6
    evs = []
    for s, loss in enumerate(losses):
        got = ctrl.update(s, loss)
        if got:
            evs.append((s, got))
    assert len(evs) == 1
    s, [ev] = evs[0]
    assert s == 8 and ev.trigger_step == 8 and ev.step == 9
    assert ev.stage == 0 and set(ev.components) == PRESENT and ev.rule == "lit"
    assert ev.window_losses == (10.0, 8.0, 7.5)
    assert ev.r == pytest.approx(0.0625) and ev.threshold == 0.1 and ev.patience_left == 0
    assert [h["r"] for h in ctrl.history] == [None, pytest.approx(0.2), pytest.approx(0.0625)]
    assert ctrl.stage == 1 and ctrl.done and ctrl.frozen_components() == set()
    assert ctrl.lr_scale(0, 8) == 0.0 and ctrl.lr_scale(0, 9) == 1.0


def test_lit_patience_decrements_without_reset():
    cfg = FreezeConfig(window=2, threshold=0.01, patience=2)
    ctrl = FreezeController(cfg, PRESENT)
    # 10 -> 9.99 (r=0.001: patience 1) -> 5 (good, no reset) -> 4.999 (r<0.01: patience 0)
    evs = feed(ctrl, windows(10, 9.99, 5, 4.999, 4, w=2))
    assert [h["patience_left"] for h in ctrl.history] == [2, 1, 1, 0]
    assert len(evs) == 1 and evs[0].step == 8 and evs[0].trigger_step == 7
    assert evs[0].window_losses == (10, 9.99, 5, 4.999)
    # nothing left to do: later windows are not recorded
    assert len(ctrl.history) == 4


def test_lit_never_fires_while_improving():
    ctrl = FreezeController(FreezeConfig(window=5, threshold=0.01), PRESENT)
    assert feed(ctrl, [10 * 0.95**s for s in range(200)]) == []
    assert ctrl.frozen_components() == PRESENT and ctrl.stage == 0
    assert all(h["r"] is None or h["r"] > 0.01 for h in ctrl.history)


def test_staged_order_unfreezes_in_order_and_windows_restart():
    cfg = FreezeConfig(unfreeze_order=[["norms"], ["mlp"], ["embed", "lm_head"]], window=2, patience=1)
    ctrl = FreezeController(cfg, PRESENT)
    assert ctrl.stages == [("norms",), ("mlp",), ("embed", "lm_head")]
    frozen_after = []
    evs = []
    for s in range(20):
        got = ctrl.update(s, 5.0)  # flat loss: every comparable window has r=0 < threshold
        evs += got
        if got:
            frozen_after.append(ctrl.frozen_components())
    # first comparison needs two windows (steps 0-1, 2-3); after each unfreeze they restart
    assert [e.step for e in evs] == [4, 8, 12]
    assert [e.stage for e in evs] == [0, 1, 2]
    assert [e.components for e in evs] == [("norms",), ("mlp",), ("embed", "lm_head")]
    assert all(e.window_losses == (5.0, 5.0) for e in evs)
    # final_norm and attn_out are named in no stage: frozen for good
    assert frozen_after == [
        {"embed", "lm_head", "final_norm", "mlp", "attn_out"},
        {"embed", "lm_head", "final_norm", "attn_out"},
        {"final_norm", "attn_out"},
    ]
    assert ctrl.done


def test_all_means_components_named_nowhere_else():
    cfg = FreezeConfig(unfreeze_order=[["all"], ["embed", "lm_head"]])
    assert [c for _, c in resolve_stages(cfg, PRESENT)] == [
        ("final_norm", "norms", "mlp", "attn_out"),
        ("embed", "lm_head"),
    ]
    # a stage whose components were not transferred is dropped (attn_out on a wide Mamba)
    cfg = FreezeConfig(unfreeze_order=[["attn_out"], ["all"]])
    assert resolve_stages(cfg, PRESENT - {"attn_out"}) == [(1, ("embed", "lm_head", "final_norm", "norms", "mlp"))]
    assert parse_unfreeze_order("norms,final_norm > mlp > embed+lm_head") == [
        ["norms", "final_norm"], ["mlp"], ["embed", "lm_head"]
    ]
    assert FreezeConfig(unfreeze_order="norms > all").unfreeze_order == [["norms"], ["all"]]
    assert format_unfreeze_order([["norms", "final_norm"], ["mlp"]]) == "norms,final_norm > mlp"


def test_rewarmup_lr_scale():
    cfg = FreezeConfig(policy="fixed", unfreeze_order=[["mlp"], ["all"]], steps=[8, 20], rewarmup_steps=4)
    ctrl = FreezeController(cfg, PRESENT)
    feed(ctrl, [1.0] * 30)
    assert [e.step for e in ctrl.events] == [8, 20]
    assert [ctrl.lr_scale(0, s) for s in range(6, 14)] == [0, 0, 0.25, 0.5, 0.75, 1, 1, 1]
    assert [ctrl.lr_scale(1, s) for s in (19, 20, 23, 100)] == [0, 0.25, 1, 1]
    assert ctrl.lr_scale(TRAINABLE, 0) == 1.0 and ctrl.lr_scale(NEVER, 10**6) == 0.0
    assert ctrl.lr_scales(9) == {TRAINABLE: 1.0, NEVER: 0.0, 0: 0.5, 1: 0.0}
    with pytest.raises(ValueError, match="stage index 2"):
        ctrl.lr_scale(2, 0)
    ctrl0 = FreezeController(FreezeConfig(policy="fixed", steps=[3], rewarmup_steps=0), PRESENT)
    feed(ctrl0, [1.0] * 5)
    assert [ctrl0.lr_scale(0, s) for s in (2, 3)] == [0.0, 1.0]


def test_lr_scale_before_release_is_zero():
    ctrl = FreezeController(FreezeConfig(), PRESENT)
    assert ctrl.lr_scale(0, 0) == 0.0 and ctrl.unfreeze_step(0) is None


@pytest.mark.parametrize("policy", ["lit", "weight_norm"])
def test_state_dict_round_trip_mid_window(policy):
    cfg = FreezeConfig(
        policy=policy, unfreeze_order=[["norms"], ["mlp"], ["all"]], window=7, threshold=0.02,
        patience=2, weight_norm_smoothing=0.5, min_steps_between=3,
    )
    n = 400
    # a noisy decaying loss and a norm with three bumps, deterministic
    losses = [3.0 + 5.0 / (1 + s / 15) + 0.05 * ((s * 37) % 11 - 5) / 5 for s in range(n)]
    norms = [1.0 + ((s % 120) / 60.0 if s % 120 < 60 else (120 - s % 120) / 60.0) + 0.01 * ((s * 13) % 7) for s in range(n)]
    ref = FreezeController(cfg, PRESENT)
    feed(ref, losses, norms=norms)
    assert ref.stage >= 2, "the sequences must exercise at least two unfreezes"
    for cut in (10, 53, 150):  # mid-window cuts, before and after unfreezes
        a = FreezeController(cfg, PRESENT)
        feed(a, losses[:cut], norms=norms[:cut])
        state = json.loads(json.dumps(a.state_dict()))
        b = FreezeController(cfg, PRESENT)
        b.load_state_dict(state)
        feed(b, losses[cut:], start=cut, norms=norms[cut:])
        assert b.events == ref.events
        assert b.history == ref.history
        assert [b.lr_scale(k, s) for k in range(3) for s in range(0, n, 5)] == [
            ref.lr_scale(k, s) for k in range(3) for s in range(0, n, 5)
        ]


def test_load_state_dict_rejects_other_setup():
    a = FreezeController(FreezeConfig(unfreeze_order=[["mlp"], ["all"]]), PRESENT)
    with pytest.raises(ValueError, match="unfreeze_order"):
        FreezeController(FreezeConfig(), PRESENT).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="policy"):
        FreezeController(FreezeConfig(policy="frozen", unfreeze_order=[["mlp"], ["all"]]), PRESENT).load_state_dict(
            a.state_dict()
        )


def test_min_steps_between_pauses_the_rule():
    cfg = FreezeConfig(unfreeze_order=[["mlp"], ["all"]], window=2, min_steps_between=5)
    ctrl = FreezeController(cfg, PRESENT)
    evs = feed(ctrl, [5.0] * 30)
    # first at 4 (as without pause); then steps 4..8 ignored, windows 9-10, 11-12 -> 13
    assert [e.step for e in evs] == [4, 13]


def test_update_rejects_non_increasing_steps_and_skips_nan():
    ctrl = FreezeController(FreezeConfig(window=2), PRESENT)
    ctrl.update(0, 5.0)
    with pytest.raises(ValueError, match="increasing"):
        ctrl.update(0, 5.0)
    ctrl.update(1, float("nan"))
    assert ctrl.nonfinite == 1 and ctrl.history[0]["loss"] == 5.0


def test_sparse_updates_still_close_windows():
    # the trainer feeds the loss every 3rd step only: windows are measured in steps
    ctrl = FreezeController(FreezeConfig(window=6), PRESENT)
    for s in range(0, 60, 3):
        ctrl.update(s, 5.0)
    assert ctrl.events and ctrl.events[0].trigger_step == 12 and ctrl.events[0].step == 13
    assert [h["step"] for h in ctrl.history] == [6, 12]


# --------------------------------------------------------------------------- other policies
def test_fixed_fires_at_given_steps_even_with_gaps():
    cfg = FreezeConfig(policy="fixed", unfreeze_order=[["norms"], ["mlp"], ["all"]], steps=[5, 10, 11])
    ctrl = FreezeController(cfg, PRESENT)
    got = {}
    for s in range(0, 20, 4):  # updates at 0, 4, 8, 12, 16
        evs = ctrl.update(s, 1.0)
        if evs:
            got[s] = [e.step for e in evs]
    assert got == {4: [5], 12: [10, 11]}
    assert ctrl.events[0].r is None and ctrl.events[0].window_losses == ()


def test_fixed_drops_steps_of_empty_stages():
    cfg = FreezeConfig(policy="fixed", unfreeze_order=[["attn_out"], ["mlp"]], steps=[5, 9])
    ctrl = FreezeController(cfg, {"mlp", "embed"})
    assert ctrl.stages == [("mlp",)]
    feed(ctrl, [1.0] * 12)
    assert [e.step for e in ctrl.events] == [9]
    assert ctrl.frozen_components() == {"embed"}  # named in no stage


def test_frozen_never_unfreezes():
    ctrl = FreezeController(FreezeConfig(policy="frozen", window=2), PRESENT)
    assert feed(ctrl, [5.0] * 100) == []
    assert ctrl.frozen_components() == PRESENT and ctrl.lr_scale(0, 99) == 0.0 and ctrl.done


def test_none_freezes_nothing():
    cfg = FreezeConfig(policy="none")
    ctrl = FreezeController(cfg, PRESENT)
    assert ctrl.num_stages == 0 and ctrl.frozen_components() == set() and ctrl.done
    assert feed(ctrl, [5.0] * 10) == [] and ctrl.lr_scale(TRAINABLE, 0) == 1.0
    m = param_stage_map({"model.embed_tokens.weight": "embed", "model.layers.0.mixer.A_log": "new"}, cfg, PRESENT)
    assert m == {"model.embed_tokens.weight": TRAINABLE, "model.layers.0.mixer.A_log": TRAINABLE}


def test_scratch_run_has_nothing_to_freeze():
    ctrl = FreezeController(FreezeConfig(), set())
    assert ctrl.num_stages == 0 and ctrl.frozen_components() == set() and ctrl.done
    assert feed(ctrl, [5.0] * 200) == []


def test_weight_norm_peak_detection():
    cfg = FreezeConfig(policy="weight_norm", window=4, patience=2)
    ctrl = FreezeController(cfg, PRESENT)
    # window means: 1, 2, 3, 2.9 (below 1), 3.5 (new max, reset), 3.4, 3.3 -> fires after 2 below
    means = [1, 2, 3, 2.9, 3.5, 3.4, 3.3, 3.0]
    norms = [m for m in means for _ in range(4)]
    evs = feed(ctrl, [5.0] * len(norms), norms=norms)
    assert [h["below"] for h in ctrl.history] == [0, 0, 0, 1, 0, 1, 2]
    assert len(evs) == 1 and evs[0].trigger_step == 27 and evs[0].step == 28
    assert evs[0].window_norms == (1, 2, 3, 2.9, 3.5, 3.4, 3.3)
    assert evs[0].r == pytest.approx(0.2 / 3.5) and evs[0].rule == "weight_norm"


def test_weight_norm_smoothing_ignores_a_single_dip_and_accepts_sparse_norms():
    # norm fed once per window (at its last step); a single dip is smoothed away
    means = [1, 2, 3, 2.5, 3.2, 3.4, 3.0, 2.6, 2.2]
    cfg = FreezeConfig(policy="weight_norm", window=5, patience=2, weight_norm_smoothing=0.5)
    ctrl = FreezeController(cfg, PRESENT)
    evs = []
    for s in range(5 * len(means)):
        evs += ctrl.update(s, 5.0, means[s // 5] if s % 5 == 4 else None)
    smoothed = [h["smoothed"] for h in ctrl.history]
    assert smoothed[:3] == [1, 1.5, 2.25]
    # the raw dip at window 3 (2.5 < 3) does not dip the smoothed value (2.375 > 2.25)
    assert ctrl.history[3]["below"] == 0
    # smoothed: ... 3.09375 (max, window 5), 3.046875, 2.82 -> two below: fires in window 7
    assert len(evs) == 1 and evs[0].trigger_step == 5 * 7 + 4 and evs[0].step == 40
    # without smoothing the raw dip counts
    raw = FreezeController(FreezeConfig(policy="weight_norm", window=5, patience=2), PRESENT)
    for s in range(5 * len(means)):
        raw.update(s, 5.0, means[s // 5] if s % 5 == 4 else None)
    assert raw.history[3]["below"] == 1


# --------------------------------------------------------------------------- params, config
def test_param_stage_map_with_a_real_model():
    from xatl_ds.models import XatlConfig, XatlForCausalLM
    from xatl_ds.models.components import components_of

    cfg_m = XatlConfig(mixer="attention", attention_layers="all", hidden_size=16, num_hidden_layers=2,
                       num_attention_heads=2, vocab_size=32, intermediate_size=32)
    name_to_comp = components_of(XatlForCausalLM(cfg_m))
    present = {"embed", "lm_head", "final_norm", "norms", "mlp"}  # attention not transferred
    cfg = FreezeConfig(unfreeze_order=[["norms"], ["mlp"], ["embed"]])
    m = param_stage_map(name_to_comp, cfg, present)
    assert set(m) == set(name_to_comp)
    for name, comp in name_to_comp.items():
        expected = {"norms": 0, "mlp": 1, "embed": 2, "attention": TRAINABLE, "lm_head": NEVER,
                    "final_norm": NEVER}[comp]
        assert m[name] == expected, name
    assert m["model.layers.1.mixer.q_proj.weight"] == TRAINABLE
    assert m["model.layers.0.mlp.up_proj.weight"] == 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(policy="sometimes"), "policy"),
        (dict(unfreeze_order=[["mlp", "ffn"]]), "unknown component 'ffn'"),
        (dict(unfreeze_order=[["mlp"], ["norms", "mlp"]]), "stages 0 and 1"),
        (dict(unfreeze_order=["mlp", "norms"]), r"unfreeze_order\[0\]"),
        (dict(unfreeze_order=[]), "unfreeze_order"),
        (dict(unfreeze_order=[["mlp"], []]), r"unfreeze_order\[1\] is empty"),
        (dict(policy="fixed"), "freeze.steps"),
        (dict(policy="fixed", unfreeze_order=[["mlp"], ["all"]], steps=[10]), "one step per stage"),
        (dict(policy="fixed", unfreeze_order=[["mlp"], ["all"]], steps=[10, 10]), "strictly increasing"),
        (dict(policy="fixed", steps=[0]), r"steps\[0\]"),
        (dict(threshold=0), "threshold"),
        (dict(threshold=float("nan")), "threshold"),
        (dict(patience=0), "patience"),
        (dict(patience=1.5), "patience"),
        (dict(window=0), "window"),
        (dict(rewarmup_steps=-1), "rewarmup_steps"),
        (dict(weight_norm_smoothing=1.0), "weight_norm_smoothing"),
        (dict(min_steps_between=-2), "min_steps_between"),
    ],
)
def test_validation_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FreezeConfig(**kwargs).validate()


def test_unknown_present_component_and_field_docs():
    with pytest.raises(ValueError, match="unknown"):
        FreezeController(FreezeConfig(), {"mlp", "ffn"})
    docs = freeze_config_fields()
    assert set(docs) == {"policy", "unfreeze_order", "threshold", "patience", "window", "steps",
                         "rewarmup_steps", "weight_norm_smoothing", "min_steps_between"}
    assert all(docs.values()) and "lit" in docs["policy"]
