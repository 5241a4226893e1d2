"""The GPU paths of the mixers: Triton kernels, JIT-compiled on first use (no install-time
build). Import these modules lazily (only when a mixer selects the ``triton`` path): the
package must import on a CPU machine without triton. Every kernel has a pure-torch oracle
and is tested on CPU under Triton's interpreter (``TRITON_INTERPRET=1``)."""
