"""Shared fixtures: tiny random source models (GPT-NeoX, Llama) and a tiny byte-level BPE.

Fixtures
--------
``tiny_tokenizer``      a PreTrainedTokenizerFast (byte-level BPE, < 320 tokens, eos/bos/pad
                        ``<|endoftext|>`` = id 0), trained once per session.
``make_source_model``   factory ``(family="neox"|"llama", seed=0, **config_overrides)`` ->
                        an eval-mode ``GPTNeoXForCausalLM`` / ``LlamaForCausalLM`` in fp32
                        whose every tensor is random (norm weights near 1, biases nonzero),
                        so a mis-mapped tensor changes the logits.
``make_source_dir``     factory ``(family="neox", *, tokenizer=True, seed=0, **overrides)`` ->
                        a fresh tmp directory holding ``save_pretrained`` safetensors (and the
                        tokenizer); ``make_source_dir.model_of(path)`` gives back the model.

Defaults: vocab 320, hidden 32, 4 layers, 4 heads (head_dim 8), intermediate 64; GPT-NeoX
with partial rotary 0.25 and parallel residual, Llama with 2 KV heads (GQA).
"""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed (imported by transformers' save path) prints its accelerator choice to stdout unless told
os.environ.setdefault("DS_ACCELERATOR", "cpu" if not os.path.exists("/dev/nvidia0") else "cuda")
# Without a GPU the Triton kernels (xatl_ds.models.gpu) run under Triton's CPU interpreter;
# it must be switched on before anything imports triton.
if not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

TINY_VOCAB = 320
_SENTENCES = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want of a wife.",
    "In the beginning God created the heaven and the earth.",
    "To be, or not to be, that is the question.",
    "A hacker is a person who enjoys exploring the details of programmable systems.",
    "The quick brown fox jumps over the lazy dog 0123456789 times.",
]


def build_tiny_tokenizer():
    """A byte-level BPE trained on a few sentences, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_SENTENCES * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def tiny_source_config(family: str = "neox", **overrides):
    """A tiny GPT-NeoX or Llama config (see the module docstring for the defaults)."""
    from transformers import GPTNeoXConfig, LlamaConfig

    common = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    if family == "neox":
        common.update(rotary_pct=0.25, use_parallel_residual=True, rotary_emb_base=10000, hidden_act="gelu")
        common.update(overrides)
        return GPTNeoXConfig(**common)
    if family == "llama":
        common.update(num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0)
        common.update(overrides)
        return LlamaConfig(**common)
    raise ValueError(f"family={family!r}: use 'neox' or 'llama'")


def build_tiny_source(family: str = "neox", seed: int = 0, **overrides):
    """A tiny random source causal LM, every tensor randomised (eval mode, fp32)."""
    from transformers import GPTNeoXForCausalLM, LlamaForCausalLM

    config = tiny_source_config(family, **overrides)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = (GPTNeoXForCausalLM if family == "neox" else LlamaForCausalLM)(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1 and "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(0.1 * noise)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def make_source_model():
    """Factory: ``make_source_model(family="neox", seed=0, **config_overrides)``."""
    return build_tiny_source


@pytest.fixture
def make_source_dir(tmp_path_factory, tiny_tokenizer):
    """Factory: ``make_source_dir(family="neox", *, tokenizer=True, seed=0, **overrides) -> Path``
    of a ``save_pretrained`` directory; ``make_source_dir.model_of(path)`` is the saved model."""
    saved: dict[Path, torch.nn.Module] = {}

    class _Factory:
        def __call__(self, family: str = "neox", *, tokenizer: bool = True, seed: int = 0, **overrides) -> Path:
            model = build_tiny_source(family, seed=seed, **overrides)
            path = tmp_path_factory.mktemp(f"src_{family}")
            model.save_pretrained(path)
            if tokenizer:
                tiny_tokenizer.save_pretrained(path)
            saved[path] = model
            return path

        @staticmethod
        def model_of(path: Path) -> torch.nn.Module:
            return saved[path]

    return _Factory()


# -- training fixtures -------------------------------------------------------------------
REPO = Path(__file__).resolve().parent.parent


def train_env() -> dict:
    """Environment for trainer subprocesses: one thread per rank, no progress bar noise."""
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env["OMP_NUM_THREADS"] = "1"
    env["TQDM_DISABLE"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """A small prepared dataset from the built-in corpus (BPE vocab = TINY_VOCAB, so the tiny
    random sources fit it)."""
    from xatl_ds.data import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare(PrepareConfig(out=out, max_chars=40_000, vocab_size=TINY_VOCAB, bpe_max_chars=200_000))
    return out
