"""Checks a launcher makes before it starts a run: what a launched rank (after the launcher,
DeepSpeed and the model are up) or the launcher itself would refuse fails here, in a few
seconds, with the file or field and the fix. ``xatl-ds train --dry-run`` and ``xatl-ds sweep
run --dry-run`` run them all and print the commands only when every one passes, so a dry run
that passes means "this will start"; a real launch runs them too.

- launch options (:func:`check_launch`): ``--num-gpus``/``--num-nodes`` >= 1, the hostfile
  exists and parses, the multi-node launcher is installed, ``--include`` names devices that
  exist; the world size they give;
- the world size against ``data.batch_size`` and ``data.micro_batch_size``;
- the precision against the device (DeepSpeed's accelerator: no fp16 on a CPU; bf16 needs a
  GPU of compute capability 8.0 or newer);
- the DeepSpeed config the trainer builds, read by DeepSpeed's own config models (nested keys
  included);
- the dataset exists, its shards match meta.json, and ``data.seq_len`` fits its splits;
- the model: a scratch size against the data's vocabulary; an XATL source and a teacher exist
  and load (config.json, the safetensors headers, not the weights), share the data's tokenizer,
  cover ``data.seq_len`` and the vocabulary, and build the student (layers, mixer options);
  an unresolved ``@source`` placeholder is named as one;
- the run folder: a finished run of another config (an extended or edited run), checkpoints of
  another config, a meta.json that cannot be read.

A source or teacher that the same sweep trains first cannot be checked yet (it is checked when
its run starts): ``check_source=False``.
"""
from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import ConfigError, RunConfig, check_ds_config, ds_config_path, load_run_config, validate_with_deepspeed
from .executor import LAUNCHERS, LaunchOptions, cuda_devices
from .rundir import RunDir

__all__ = ["PreflightError", "preflight", "check_launch", "check_run_dir", "check_finished", "build_ds_config",
           "resolve_precision", "LAUNCHER_PROGRAMS"]  # fmt: skip


class PreflightError(ValueError):
    """A run would fail once launched; the message names the file or field and the fix."""


#: the program each multi-node launcher runs on this node (DeepSpeed's runner calls it)
LAUNCHER_PROGRAMS = {"pdsh": "pdsh", "openmpi": "mpirun", "mvapich": "mpirun", "slurm": "srun", "mpich": "mpirun",
                     "impi": "mpirun"}  # fmt: skip


# -- the DeepSpeed config the trainer builds -------------------------------------------------
def resolve_precision(cfg: RunConfig, device_type: str) -> str:
    """``deepspeed.precision`` on a ``cuda`` or ``cpu`` device (``auto``: bf16 on CUDA, else fp32)."""
    p = cfg.deepspeed.precision
    if p == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return p


def build_ds_config(cfg: RunConfig, world: int, precision: str) -> dict:
    """The named ds_configs/ JSON with batch, clipping and precision filled from the run."""
    ds = check_ds_config(ds_config_path(cfg.deepspeed.config))
    micro, gas = cfg.batch_layout(world)
    ds["train_batch_size"] = cfg.data.batch_size
    ds["train_micro_batch_size_per_gpu"] = micro
    ds["gradient_accumulation_steps"] = gas
    ds["gradient_clipping"] = cfg.optim.grad_clip
    ds.pop("scheduler", None)  # a DS scheduler would overwrite the per-stage learning rates
    ds.pop("optimizer", None)  # the client AdamW carries the stage groups
    for key in ("bf16", "fp16"):
        ds.pop(key, None)
    if precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    for k, v in list(ds.items()):
        if v == "auto":
            raise ConfigError(f"{cfg.deepspeed.config}: field {k!r} is 'auto' and xatl-ds cannot fill it")
    return ds


# -- launch options --------------------------------------------------------------------------
def _hostfile(path: str) -> dict[str, int]:
    """host -> slots of a DeepSpeed hostfile (``host slots=N`` lines, ``#`` comments)."""
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a directory" if p.is_dir() else "does not exist"
        raise PreflightError(f"--hostfile {path!r} {what}; give a file of 'HOST slots=N' lines (one per node), or "
                             "drop --hostfile to run on this node")  # fmt: skip
    hosts: dict[str, int] = {}
    for n, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        slots = parts[1].removeprefix("slots=") if len(parts) == 2 and parts[1].startswith("slots=") else ""
        if not slots.isdigit() or int(slots) < 1 or parts[0] in hosts:
            why = f"host {parts[0]!r} appears twice" if slots.isdigit() and parts[0] in hosts else "not 'HOST slots=N'"
            raise PreflightError(f"--hostfile {path!r}, line {n}: {line!r} is {why}; write one 'HOST slots=N' line "
                                 "per node (N >= 1)")  # fmt: skip
        hosts[parts[0]] = int(slots)
    if not hosts:
        raise PreflightError(f"--hostfile {path!r} names no host; write one 'HOST slots=N' line per node")
    return hosts


def _include(spec: str, hosts: dict[str, int] | None) -> int:
    """Ranks of ``--include host:0,1@host2:2`` (devices of each host, or all its slots)."""
    total = 0
    for part in spec.split("@"):
        host, _, devs = part.partition(":")
        if not host.strip():
            raise PreflightError(f"--include {spec!r}: {part!r} names no host; write e.g. localhost:0,1")
        if not devs:
            if hosts is None or host not in hosts:
                raise PreflightError(f"--include {spec!r}: {host!r} gives no devices; write e.g. {host}:0,1")
            total += hosts[host]
            continue
        ids = [d.strip() for d in devs.split(",")]
        if not all(d.isdigit() for d in ids) or len(set(ids)) != len(ids):
            raise PreflightError(f"--include {spec!r}: devices {devs!r} must be distinct indices, e.g. {host}:0,1")
        if hosts is not None and host not in hosts:
            raise PreflightError(f"--include {spec!r}: {host!r} is not in the hostfile {sorted(hosts)}")
        total += len(ids)
    return total


def check_launch(opts: LaunchOptions | None, gpus: int | None = None) -> int:
    """The world size ``opts`` give, after refusing what the launcher would: ranks or nodes
    below 1, a missing or malformed hostfile, more nodes than it names, a multi-node launcher
    that is not installed, ``--include`` devices beyond this node's GPUs. ``gpus``: this node's
    GPUs (default: :func:`xatl_ds.executor.cuda_devices`)."""
    o = opts or LaunchOptions()
    for flag, v in (("--num-gpus", o.num_gpus), ("--num-nodes", o.num_nodes)):
        if v is not None and v < 1:
            raise PreflightError(f"{flag} {v}: a run needs at least one; omit {flag} (default: "
                                 f"{'all GPUs, or 1 rank on CPU' if flag == '--num-gpus' else 'every host'}) "
                                 "or give a number >= 1")  # fmt: skip
    if o.launcher is not None and o.launcher not in LAUNCHERS:
        raise PreflightError(f"--launcher {o.launcher!r} is unknown; choose one of {list(LAUNCHERS)}")
    hosts = _hostfile(o.hostfile) if o.hostfile else None
    if o.master_port is not None and not 0 < o.master_port < 65536:
        raise PreflightError(f"--master-port {o.master_port} is not a TCP port; give 1..65535 or omit it (a free one)")
    if hosts is None:
        if o.num_nodes and o.num_nodes > 1:
            raise PreflightError(f"--num-nodes {o.num_nodes} needs --hostfile naming the nodes; without one a run "
                                 "uses this node only")  # fmt: skip
        gpus = cuda_devices() if gpus is None else gpus
        if o.include:
            world = _include(o.include, None)
            bad = [d for part in o.include.split("@") for d in part.partition(":")[2].split(",")
                   if gpus and d.strip().isdigit() and int(d) >= gpus]  # fmt: skip
            if bad:
                raise PreflightError(f"--include {o.include!r} names device(s) {bad}, but this node has {gpus} GPUs "
                                     f"(0..{gpus - 1})")  # fmt: skip
            return world
        if gpus and o.num_gpus and o.num_gpus > gpus:
            raise PreflightError(f"--num-gpus {o.num_gpus}, but this node has {gpus} GPUs; give at most {gpus}")
        return o.num_gpus or gpus or 1
    if o.num_nodes and o.num_nodes > len(hosts):
        raise PreflightError(f"--num-nodes {o.num_nodes}, but --hostfile {o.hostfile!r} names {len(hosts)} host(s) "
                             f"{sorted(hosts)}")  # fmt: skip
    nodes = list(hosts)[: o.num_nodes or len(hosts)]
    remote = [h for h in nodes if h not in ("localhost", "127.0.0.1")]
    if len(nodes) > 1 or remote:
        program = LAUNCHER_PROGRAMS[o.launcher or "pdsh"]
        if shutil.which(program) is None:
            raise PreflightError(f"--launcher {o.launcher or 'pdsh (the default)'} runs {program!r}, which is not "
                                 f"installed on this node (not on PATH); install it or choose another --launcher "
                                 f"({', '.join(LAUNCHERS)})")  # fmt: skip
    if o.include:
        return _include(o.include, hosts)
    if o.num_gpus:
        return o.num_gpus * len(nodes)
    return sum(hosts[h] for h in nodes)


def _gpu_compute_capability() -> float | None:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)  # fmt: skip
        caps = [float(x) for x in out.stdout.split()]
        return min(caps) if caps else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def check_precision(cfg: RunConfig, gpus: int) -> str:
    """The run's precision on this node (``gpus`` GPUs), refusing what DeepSpeed's engine would."""
    device = "cuda" if gpus else "cpu"
    p = resolve_precision(cfg, device)
    if device == "cpu" and p in ("fp16", "bf16"):
        import contextlib
        import sys

        with contextlib.redirect_stdout(sys.stderr):
            from deepspeed.accelerator import get_accelerator

            acc = get_accelerator()
        ok = acc.is_fp16_supported() if p == "fp16" else acc.is_bf16_supported()
        if not ok:
            raise PreflightError(f"deepspeed.precision={cfg.deepspeed.precision!r}: DeepSpeed's "
                                 f"{acc.device_name()} accelerator does not support {p} on this machine (no GPU); "
                                 "use precision: auto (fp32 on CPU) or fp32, or run on a GPU")  # fmt: skip
    if device == "cuda" and p == "bf16":
        cap = _gpu_compute_capability()
        if cap is not None and cap < 8.0:
            raise PreflightError(f"deepspeed.precision={cfg.deepspeed.precision!r} means bf16, which needs a GPU of "
                                 f"compute capability 8.0 or newer (this one: {cap}); use fp16 or fp32")  # fmt: skip
    return p


# -- the run folder --------------------------------------------------------------------------
def recorded_hash(rd: RunDir) -> str | None:
    """The content hash of the config an unfinished run folder was started with (its
    config.yaml), None without one."""
    if not rd.config.is_file():
        return None
    try:
        return load_run_config(rd.config, machine_checks=False).content_hash()
    except ConfigError:
        return None


def check_run_dir(cfg: RunConfig) -> bool:
    """Whether ``cfg.out_dir`` holds this config's finished run (nothing to train); raise for a
    finished run of another config (extended or edited since), checkpoints of another config
    and a meta.json that cannot be read."""
    rd = RunDir(cfg.out_dir)
    if rd.path.exists() and not rd.path.is_dir():
        raise PreflightError(f"out_dir={cfg.out_dir!r} is a file; choose a folder for the run")
    if rd.is_done():
        try:
            done_hash = rd.meta().get("config_hash")
        except ValueError as e:
            raise PreflightError(f"{e}; or delete {rd.done_path} to train the run again") from None
        if done_hash is not None and done_hash != cfg.content_hash():
            raise PreflightError(
                f"{rd.path} holds a finished run of a different config (hash {done_hash}, this config "
                f"{cfg.content_hash()}; extending a budget or editing a field changes it): use another out_dir, "
                f"or delete {rd.path} to train it again"
            )
        return True
    if rd.has_checkpoint():
        old = recorded_hash(rd)
        if old is not None and old != cfg.content_hash():
            raise PreflightError(
                f"{rd.path} holds checkpoints of a different run config (hash {old} in {rd.config}, this config "
                f"{cfg.content_hash()}): it would not resume; use another out_dir or delete {rd.checkpoints}"
            )
    return False


def check_finished(rd: RunDir, cfg: RunConfig) -> bool:
    """The trainer's :func:`check_run_dir` for run folder ``rd`` (default ``cfg.out_dir``):
    whether it holds this config's finished run. A finished run of a *different* config
    (edited since) is a ConfigError: its results would be taken for this one's."""
    if Path(rd.path) != Path(cfg.out_dir):
        cfg = replace(cfg, out_dir=str(rd.path))
    try:
        return check_run_dir(cfg)
    except PreflightError as e:
        raise ConfigError(str(e)) from None


# -- data and model ------------------------------------------------------------------------
def _check_data(cfg: RunConfig) -> int:
    """The dataset's vocabulary size, after checking its splits."""
    from .data import DataError, PackedTokens

    try:
        for split in ("train", "val"):
            tokens = PackedTokens(cfg.data.path, split)
            tokens.check_fits(cfg.data.seq_len, cfg.eval.batches if split == "val" else 1, 1)
    except DataError as e:
        raise PreflightError(f"data.path={cfg.data.path!r}: {e}") from None
    return tokens.vocab_size


def _model_source(cfg: RunConfig, field: str, spec: str) -> Any:
    """The transformers config of a source or teacher ``spec`` after every check short of
    reading its weights (files, safetensors headers, the data's tokenizer)."""
    from .data import DataError, dataset_tokenizer_fingerprint
    from .runspec import SOURCE_REF
    from .transfer import TransferError, check_tokenizer_compat, source_config

    if spec.startswith(SOURCE_REF) or spec.startswith("@"):
        raise PreflightError(f"{field}={spec!r} is a placeholder that no planner resolved: '@source' and "
                             "'@source:NAME' are for sweeps and studies (sweep run / tune), which replace them by "
                             "their source run's export; in a run config give a model directory or hub name")  # fmt: skip
    try:
        config, _ = source_config(spec)
        check_tokenizer_compat(spec, dataset_tokenizer_fingerprint(cfg.data.path))
    except (TransferError, DataError, OSError, ValueError) as e:
        raise PreflightError(f"{field}={spec!r}: {e}") from None
    return config


def _check_model(cfg: RunConfig, vocab: int, check_source: bool) -> None:
    from .build import model_config

    if cfg.init.kind == "scratch":
        student = model_config(cfg, vocab)
    elif not check_source:
        return
    else:
        student = model_config(cfg, vocab, _model_source(cfg, "init.source", cfg.init.source))
    if not (cfg.distill.enabled or cfg.align.enabled):
        return
    from .distill import TeacherError, check_alignable, teacher_spec

    spec = teacher_spec(cfg)
    if spec == cfg.init.source and not check_source:
        return
    field = "distill.teacher" if cfg.distill.teacher else "init.source (the default teacher)"
    teacher = model_config_of_teacher(cfg, field, spec)
    if teacher.vocab_size != student.vocab_size:
        raise PreflightError(f"{field}={spec!r} has vocabulary {teacher.vocab_size} but the student has "
                             f"{student.vocab_size}: their next-token distributions cannot be compared; use a teacher "
                             "with the student's tokenizer and vocabulary")  # fmt: skip
    if cfg.data.seq_len > teacher.max_position_embeddings:
        raise PreflightError(f"data.seq_len={cfg.data.seq_len} is longer than teacher {spec!r} was trained for "
                             f"(max_position_embeddings {teacher.max_position_embeddings}); lower data.seq_len")
    if cfg.align.enabled:
        try:
            check_alignable(student, teacher, spec)
        except TeacherError as e:
            raise PreflightError(f"distill.teacher: {e}") from None


def model_config_of_teacher(cfg: RunConfig, field: str, spec: str):
    """The all-attention XatlConfig a teacher ``spec`` loads as (its weights unread)."""
    from .models import XatlConfig

    try:
        return XatlConfig.from_source(_model_source(cfg, field, spec), mixer="attention", attention_layers="all")
    except ValueError as e:
        if isinstance(e, PreflightError):
            raise
        raise PreflightError(f"{field}={spec!r}: {e}") from None


# -- all of it -----------------------------------------------------------------------------------
def preflight(cfg: RunConfig, *, world_size: int | None = None, check_source: bool = True,
              launch: LaunchOptions | None = None, gpus: int | None = None) -> None:  # fmt: skip
    """Raise :class:`PreflightError` for the first problem found (see the module docstring).
    ``launch``: the launch options (their world size, unless ``world_size`` is given);
    ``gpus``: this node's GPU count (default: detected)."""
    try:
        gpus = cuda_devices() if gpus is None else gpus
        if launch is not None:
            ws = check_launch(launch, gpus)
            world_size = world_size or ws
        precision = check_precision(cfg, gpus)
        if check_run_dir(cfg):
            return  # finished: the trainer says so and exits
        ds_config_path(cfg.deepspeed.config)
        if world_size:
            validate_with_deepspeed(build_ds_config(cfg, world_size, precision),
                                    f"the DeepSpeed config built from {cfg.deepspeed.config!r}")  # fmt: skip
        vocab = _check_data(cfg)
        _check_model(cfg, vocab, check_source)
    except ConfigError as e:
        raise PreflightError(str(e)) from None

