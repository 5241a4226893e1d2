"""Reading the trainer's DeepSpeed checkpoints back as one full fp32 state dict."""
from __future__ import annotations

from pathlib import Path

import torch


def consolidated_state_dict(ckpt_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Full fp32 model weights of checkpoint ``tag`` (default: the latest) at any ZeRO stage.

    ZeRO 1-3 keep the fp32 master weights partitioned in the optimizer states; DeepSpeed's
    own consolidation reads them. Stage 0 saves the whole module in one file.
    """
    ckpt_dir = Path(ckpt_dir)
    if tag is None:
        tag = (ckpt_dir / "latest").read_text().strip()
    d = ckpt_dir / tag
    if not d.is_dir():
        raise FileNotFoundError(f"no checkpoint {tag!r} in {ckpt_dir}")
    if list(d.glob("*optim_states.pt")) and any("zero" in p.name for p in d.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        return {k: v.float() for k, v in sd.items()}
    # stage 0: DeepSpeed pickles its engine state next to the weights; these are our own
    # files, but still read them without executing code: only tensors and plain containers.
    state = torch.load(d / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    return {k: v.float() for k, v in state["module"].items()}
