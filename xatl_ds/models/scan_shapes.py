"""The selective scan's channel-last shape contract, shared by the torch, C++ and Triton
scans (a module of its own: the Triton side must not import the mixer, and the mixer must not
import the GPU package at module level, which the remote-code export would refuse)."""
from __future__ import annotations


def check_scan_shapes(u, delta, A, B, C, D, z, delta_bias) -> None:
    """The selective scan's channel-last shapes (shared by the torch, C++ and Triton scans)."""
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, length, d_inner), got shape {tuple(u.shape)}")
    b, length, d = u.shape
    if A.dim() != 2 or A.shape[0] != d:
        raise ValueError(f"A must be (d_inner={d}, d_state), got {tuple(A.shape)}")
    n = A.shape[1]
    for name, t, shape in (
        ("delta", delta, (b, length, d)),
        ("z", z, (b, length, d)),
        ("B", B, (b, length, n)),
        ("C", C, (b, length, n)),
        ("D", D, (d,)),
        ("delta_bias", delta_bias, (d,)),
    ):
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} (channel-last layout), got {tuple(t.shape)}")
