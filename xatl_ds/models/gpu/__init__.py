"""The GPU paths of the mixers: Triton kernels, JIT-compiled on first use (no install-time
build). Import these modules lazily (only when a mixer selects the ``triton`` path): the
package must import on a CPU machine without triton. Every kernel has a pure-torch oracle
and is tested on CPU under Triton's interpreter (``TRITON_INTERPRET=1``)."""


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
