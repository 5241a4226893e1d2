"""Cross-architecture weight transfer: a pretrained Transformer -> an :class:`XatlForCausalLM`.

The target's blocks mirror the source family (``XatlConfig.from_source``, built on the
family adapters in :mod:`xatl_ds.families`), so every tensor the two share has the same
shape and meaning. A transfer is planned, then copied:

* :mod:`.planner`    which target tensor gets which source tensor, per component, with the
                     strictness rule and skip reasons (the components are listed there);
* :mod:`.mixer_init` how the new LCI mixers start (``random``, ``zero_out``, ``attention``);
* :mod:`.copier`     executes the plan and fills the :class:`TransferReport` (:mod:`.report`);
  :func:`transfer` plans and copies in one call;
* :mod:`.source`     loads a source safely (safetensors only, truncated files named);
* :mod:`.tokenizer`  checks that the dataset shares the source's tokenizer;
* :mod:`.request`    one transfer as a value, and the load-build-transfer-save job on it;
"""
from __future__ import annotations

from ..families import SUPPORTED_SOURCES, source_config_kwargs, source_family
from ..models.components import COMPONENTS
from .copier import copy_plan, transfer
from .errors import MixerInitError, SourceLoadError, TokenizerMismatchError, TransferError
from .mixer_init import MIXER_INITS
from .planner import ATTN_OUT_MISMATCH, DEFAULT_COMPONENTS, TransferPlan, plan_transfer
from .request import TransferRequest, transfer_to_dir
from .report import REPORT_FILE, ComponentReport, InitTensor, LayerInitReport, TensorCopy, TransferReport, transferred_parameter_names
from .source import LoadedSource, check_source_files, load_source, source_config
from .target import build_target
from .tokenizer import check_tokenizer_compat

__all__ = [
    "ATTN_OUT_MISMATCH",
    "check_source_files",
    "COMPONENTS",
    "DEFAULT_COMPONENTS",
    "MIXER_INITS",
    "REPORT_FILE",
    "SUPPORTED_SOURCES",
    "ComponentReport",
    "InitTensor",
    "LayerInitReport",
    "LoadedSource",
    "MixerInitError",
    "SourceLoadError",
    "TensorCopy",
    "TokenizerMismatchError",
    "TransferError",
    "TransferPlan",
    "TransferReport",
    "TransferRequest",
    "build_target",
    "check_tokenizer_compat",
    "copy_plan",
    "load_source",
    "source_config",
    "plan_transfer",
    "source_config_kwargs",
    "source_family",
    "transfer",
    "transfer_to_dir",
    "transferred_parameter_names",
]
