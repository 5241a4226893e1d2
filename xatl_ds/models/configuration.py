"""`XatlConfig`: one Transformer-shaped block family whose per-layer mixer can be swapped.

The block (norms, MLP, residual layout) mirrors the source family so every tensor the
source shares with the target has the same shape and meaning; only the token mixer of each
layer differs (attention, retention or a selective SSM).
"""
from __future__ import annotations

import inspect
from typing import Any, Sequence

from transformers import PretrainedConfig

from ..families import check_target_options, source_config_kwargs  # dependency-free: no import cycle

FAMILIES = ("neox", "llama")
MIXERS = ("attention", "retnet", "mamba", "mamba2")
KERNEL_MODES = ("auto", "triton", "torch", "cuda")


def resolve_attention_layers(spec: Any, n_layers: int) -> list[int]:
    """Turn an attention-layer spec into sorted, unique, 0-based layer indices.

    ``None``/``"none"``/``[]`` -> no attention layer; ``"paper"`` -> the 2nd and the middle
    layer, ``[1, n_layers // 2 - 1]`` as in the XATL release; ``"all"`` -> every layer;
    a list (or comma string) of ints -> those layers (negative indices count from the end).
    """
    if spec is None:
        return []
    if isinstance(spec, str):
        s = spec.strip().lower()
        if s in ("", "none"):
            return []
        if s == "paper":
            if n_layers < 4:
                raise ValueError(
                    f"attention_layers='paper' needs at least 4 layers (got n_layers={n_layers}); "
                    "give explicit indices instead, e.g. attention_layers=[1]"
                )
            return sorted({1, n_layers // 2 - 1})
        if s == "all":
            return list(range(n_layers))
        try:
            spec = [int(p) for p in s.split(",") if p.strip()]
        except ValueError:
            raise ValueError(
                f"attention_layers={spec!r} is not understood: use 'none', 'paper', 'all' "
                "or a list of layer indices like [1, 5]"
            ) from None
    if isinstance(spec, int):
        spec = [spec]
    if not isinstance(spec, Sequence):
        raise ValueError(f"attention_layers must be a string or a list of ints, got {type(spec).__name__}")
    out = set()
    for i in spec:
        if isinstance(i, bool) or not isinstance(i, int):
            raise ValueError(f"attention_layers entries must be ints, got {i!r}")
        j = i + n_layers if i < 0 else i
        if not 0 <= j < n_layers:
            raise ValueError(f"attention_layers index {i} is out of range for n_layers={n_layers}")
        out.add(j)
    return sorted(out)


class XatlConfig(PretrainedConfig):
    """Configuration of an XATL target (or source-shaped) causal LM.

    Block fields follow the source family; ``mixer`` is used in every layer except
    ``attention_layers``, which keep the source's attention.
    """

    model_type = "xatl"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        family: str = "neox",
        vocab_size: int = 4096,
        hidden_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        intermediate_size: int | None = None,
        hidden_act: str | None = None,
        max_position_embeddings: int = 2048,
        rotary_pct: float | None = None,
        rope_theta: float = 10000.0,
        norm_eps: float = 1e-5,
        use_parallel_residual: bool | None = None,
        attention_bias: bool | None = None,
        mlp_bias: bool | None = None,
        tie_word_embeddings: bool = False,
        initializer_range: float = 0.02,
        mixer: str = "mamba",
        attention_layers: Any = None,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        mamba_conv_bias: bool = True,
        mamba_proj_bias: bool = False,
        mamba2_headdim: int = 64,
        mamba2_ngroups: int = 1,
        chunk_size: int = 64,
        retnet_heads: int | None = None,
        kernels: str = "auto",
        bos_token_id: int | None = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        **kwargs: Any,
    ):
        if family not in FAMILIES:
            raise ValueError(f"family={family!r} is unknown; choose one of {FAMILIES}")
        if mixer not in MIXERS:
            raise ValueError(f"mixer={mixer!r} is unknown; choose one of {MIXERS}")
        if kernels not in KERNEL_MODES:
            raise ValueError(f"kernels={kernels!r} is unknown; choose one of {KERNEL_MODES}")
        neox = family == "neox"
        self.family = family
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size={hidden_size} is not divisible by num_attention_heads={num_attention_heads}"
            )
        if num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        self.intermediate_size = intermediate_size or (4 * hidden_size if neox else int(8 * hidden_size / 3))
        self.hidden_act = hidden_act or ("gelu" if neox else "silu")
        self.max_position_embeddings = max_position_embeddings
        self.rotary_pct = (0.25 if neox else 1.0) if rotary_pct is None else rotary_pct
        self.rope_theta = rope_theta
        self.norm_eps = norm_eps
        self.use_parallel_residual = neox if use_parallel_residual is None else use_parallel_residual
        self.attention_bias = neox if attention_bias is None else attention_bias
        self.mlp_bias = neox if mlp_bias is None else mlp_bias
        self.initializer_range = initializer_range
        self.mixer = mixer
        self.attention_layers = resolve_attention_layers(attention_layers, num_hidden_layers)
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.dt_rank = dt_rank
        self.mamba_conv_bias = mamba_conv_bias
        self.mamba_proj_bias = mamba_proj_bias
        self.mamba2_headdim = mamba2_headdim
        self.mamba2_ngroups = mamba2_ngroups
        self.chunk_size = chunk_size
        self.retnet_heads = retnet_heads or num_attention_heads
        self.kernels = kernels
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @classmethod
    def from_source(
        cls, source_config: Any, mixer: str = "mamba", attention_layers: Any = None, **ssm_options: Any
    ) -> "XatlConfig":
        """A target config whose blocks reproduce ``source_config``'s (a GPT-NeoX or
        Llama-shaped transformers config, or a model carrying one): family, vocab, sizes,
        heads, activation, RoPE (from ``rope_parameters``), norm eps, residual layout, biases,
        tied embeddings and special token ids come from the source; ``mixer``,
        ``attention_layers`` and mixer options (``d_state``, ``d_conv``, ``expand``, ...) from
        the caller. ValueError for an unsupported source or an option the source fixes."""
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs", "mixer", "attention_layers"}
        check_target_options(ssm_options, accepted)
        return cls(**source_config_kwargs(source_config), mixer=mixer, attention_layers=attention_layers, **ssm_options)

    # -- derived -------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def d_inner(self) -> int:
        return self.expand * self.hidden_size

    @property
    def dt_rank_value(self) -> int:
        return -(-self.hidden_size // 16) if self.dt_rank == "auto" else int(self.dt_rank)

    @property
    def layer_mixers(self) -> list[str]:
        """The mixer kind of each layer, attention layers included."""
        att = set(self.attention_layers)
        return ["attention" if i in att else self.mixer for i in range(self.num_hidden_layers)]
