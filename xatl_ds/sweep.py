"""Scaling sweeps: a grid of run configs, launched one after another (or a few at a time)
through the ``deepspeed`` launcher, skipping finished runs and resuming broken ones.

A sweep YAML::

    name: quickstart                 # default: the file's stem
    out_dir: runs/sweeps/quickstart  # sweep root (relative to the working directory)
    launch: {num_gpus: 1}            # LaunchOptions defaults; command-line options win
    source:                          # optional: a source Transformer trained first
      model: {size: tiny}            # (defaults: mixer attention, init scratch; data,
      budget: {steps: 300}           #  deepspeed, eval, checkpoint come from base)
    base:                            # the run config every run starts from
      init: {source: "@source"}      # "@source" -> <root>/runs/<source run>/hf
      budget: {flops: 1.0e15}        # one FLOP budget for every run: compute-matched
    axes:                            # combined as a grid, in this order
      seed: [0, 1]                                    # a key -> values
      arch:                                           # keys zipped together
        zip: {model.mixer: [mamba, retnet], model.attention_layers: [none, paper]}
        labels: [mamba, retnet-hybrid]                # optional readable labels
      init:                                           # presets: dicts of overrides
        - {label: scratch, init.kind: scratch}
        - {label: xatl-lit, init.kind: xatl, freeze.policy: lit}

Budgets: set ``budget.flops`` (analytic training FLOPs, :mod:`xatl_ds.flops`) in ``base``
and every run, XATL or scratch, frozen or not, stops at the same compute; frozen steps
cost fewer FLOPs, so XATL runs take more steps for the same budget. ``budget.tokens``
matches data instead of compute.

A scratch run (``init.kind: scratch`` after the overrides) drops ``init.source``, so XATL and
scratch runs can share axes that set the source (e.g. zipped with ``model.size``).

Layout of the root: ``configs/<run>.yaml`` (each expanded run config), ``runs/<run>/`` (the
trainer's out_dir), ``logs/<run>.log``, ``sweep.json`` and ``index.csv`` (run id, name, config
path, state, return code, times). ``<run>`` is ``<readable name>-<content hash>``.
"""
from __future__ import annotations

import argparse
import copy
import csv
import itertools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TextIO

import yaml

from .launch import LaunchOptions, add_opts_cli, deepspeed_command, train_env

#: placeholder for ``init.source``: the sweep's own source run (its ``hf`` export)
SOURCE_REF = "@source"
STATES = ("pending", "running", "done", "failed")
#: sections a source run takes from ``base`` unless it sets them
_SOURCE_INHERITS = ("data", "deepspeed", "eval", "checkpoint", "log_every")
_SWEEP_KEYS = {"name", "out_dir", "base", "axes", "source", "launch"}


class SweepError(ValueError):
    """A sweep file is wrong; the message names the run and field and the fix."""


@dataclass
class Axis:
    """One grid dimension: ``values[i]`` is a dict of dotted overrides with label ``labels[i]``."""

    name: str
    values: list[dict[str, Any]]
    labels: list[str]


@dataclass
class SweepRun:
    """One expanded run of a sweep."""

    id: str
    """RunConfig.content_hash() of the run."""
    name: str
    """Readable name, e.g. ``mamba-xatl-lit-s0``."""
    key: str
    """``<name>-<id>``: the run's directory and file stem under the sweep root."""
    config: dict
    """The validated run config as a plain dict."""
    config_path: Path
    out_dir: Path
    is_source: bool = False
    needs_source: bool = False


@dataclass
class Sweep:
    """A parsed sweep file (see the module docstring)."""

    name: str
    root: Path
    base: dict
    axes: list[Axis]
    source: dict | None = None
    launch: LaunchOptions = field(default_factory=LaunchOptions)
    path: Path | None = None


# -- parsing -------------------------------------------------------------------------------
def load_sweep(source: str | Path | dict) -> Sweep:
    """Read and check a sweep file (or dict): structure only; :func:`expand` validates runs."""
    from .config import read_yaml_source

    data, path = read_yaml_source(source, "sweep file", SweepError)
    if not isinstance(data, dict):
        raise SweepError("a sweep file must be a mapping with base: and axes:")
    unknown = sorted(set(data) - _SWEEP_KEYS)
    if unknown:
        raise SweepError(f"unknown sweep key(s) {unknown}; valid: {sorted(_SWEEP_KEYS)}")
    name = str(data.get("name") or (path.stem if path else "sweep"))
    base = data.get("base") or {}
    if not isinstance(base, dict):
        raise SweepError("base: must be a run config mapping")
    raw_axes = data.get("axes") or {}
    if not isinstance(raw_axes, dict):
        raise SweepError("axes: must be a mapping of axis name -> values (see xatl_ds/sweep.py)")
    axes = [_parse_axis(k, v) for k, v in raw_axes.items()]
    src = data.get("source")
    if src is not None and not isinstance(src, dict):
        raise SweepError("source: must be a run config mapping for the source Transformer")
    launch = data.get("launch") or {}
    names = {f.name for f in fields(LaunchOptions)}
    if not isinstance(launch, dict) or set(launch) - names:
        raise SweepError(f"launch: unknown option(s) {sorted(set(launch) - names)}; valid: {sorted(names)}")
    root = Path(data.get("out_dir") or f"runs/sweeps/{name}")
    return Sweep(name=name, root=root, base=base, axes=axes, source=src, launch=LaunchOptions(**launch), path=path)


def _parse_axis(name: str, spec: Any) -> Axis:
    if isinstance(spec, dict) and "presets" in spec:
        spec = spec["presets"]
    if isinstance(spec, dict) and "zip" in spec:
        group = spec["zip"]
        if not isinstance(group, dict) or not group or not all(isinstance(v, list) for v in group.values()):
            raise SweepError(f"axes.{name}.zip must map config keys to lists of equal length")
        lengths = {k: len(v) for k, v in group.items()}
        if len(set(lengths.values())) != 1:
            raise SweepError(f"axes.{name}.zip: lists differ in length {lengths}; zipped keys need equal lengths")
        n = next(iter(lengths.values()))
        values = [{k: group[k][i] for k in group} for i in range(n)]
        labels = spec.get("labels")
        if labels is not None and (not isinstance(labels, list) or len(labels) != n):
            raise SweepError(f"axes.{name}.labels must be a list of {n} names, one per zipped value")
        labels = [str(x) for x in labels] if labels else ["-".join(t for k, v in d.items() if (t := _token(k, v))) for d in values]
        return Axis(name, values, labels)
    if not isinstance(spec, list) or not spec:
        raise SweepError(f"axes.{name} must be a non-empty list of values, a {{zip: ...}} group or a list of presets")
    if all(isinstance(v, dict) for v in spec):  # presets
        values, labels = [], []
        for i, preset in enumerate(spec):
            preset = dict(preset)
            label = preset.pop("label", None)
            if not preset:
                raise SweepError(f"axes.{name}[{i}] is an empty preset; give dotted overrides like init.kind: xatl")
            values.append(preset)
            labels.append(str(label) if label is not None else "-".join(t for k, v in preset.items() if (t := _token(k, v))))
        return Axis(name, values, labels)
    if any(isinstance(v, dict) for v in spec):
        raise SweepError(f"axes.{name} mixes presets (dicts) and plain values; use one kind")
    return Axis(name, [{name: v} for v in spec], [_token(name, v) for v in spec])


def _token(key: str, value: Any) -> str:
    """A short readable name part for ``key=value``."""
    last = key.split(".")[-1]
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        return ""
    if last == "seed":
        return f"s{value}"
    if last == "source" and isinstance(value, str):
        return "" if value == SOURCE_REF else Path(value.rstrip("/")).name.lower()
    if isinstance(value, bool):
        return last if value else f"no-{last}"
    if isinstance(value, (int, float)):
        return f"{last}{value:g}"
    if last == "attention_layers":
        return "attn" + ("_".join(map(str, value)) if isinstance(value, list) else f"-{value}")
    if isinstance(value, list):
        return "_".join(_token(key, v) if isinstance(v, (list, dict)) else str(v) for v in value)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(value))


# -- expansion -----------------------------------------------------------------------------
def set_dotted(d: dict, key: str, value: Any) -> None:
    """``d[a][b] = value`` for ``key = "a.b"``; a dict value merges into an existing dict."""
    node = d
    parts = key.split(".")
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise SweepError(f"{key}: {p} is not a section")
        node = nxt
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        node[parts[-1]] = _merge(node[parts[-1]], value)
    else:
        node[parts[-1]] = copy.deepcopy(value)


def _merge(a: dict, b: dict) -> dict:
    out = copy.deepcopy(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _apply(base: dict, overrides: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in overrides.items():
        set_dotted(out, k, v)
    return out


def _finish(sweep: Sweep, cfg: dict, name: str, is_source: bool = False) -> SweepRun:
    """Validate ``cfg`` and give it its id, key, out_dir and config path."""
    from .config import ConfigError, load_run_config

    init = cfg.setdefault("init", {})
    if init.get("kind", "scratch") == "scratch":
        init.pop("source", None)  # scratch twins share the axes that name a source
    needs_source = init.get("source") == SOURCE_REF
    if needs_source:
        if sweep.source is None:
            raise SweepError(f"run {name}: init.source is {SOURCE_REF!r} but the sweep has no source: section")
        init["source"] = "<source>"  # placeholder path for the hash; replaced below
    cfg["name"] = name
    cfg["out_dir"] = "<set below>"
    try:
        rc = load_run_config(cfg)
    except ConfigError as e:
        raise SweepError(f"run {name}: {e}") from None
    return _placed(sweep, rc.to_dict(), name, rc.content_hash(), is_source, needs_source)


def _placed(sweep: Sweep, cfg: dict, name: str, rid: str, is_source: bool, needs_source: bool) -> SweepRun:
    key = f"{name}-{rid}"
    out = sweep.root / "runs" / key
    cfg["out_dir"] = str(out)
    return SweepRun(id=rid, name=name, key=key, config=cfg, config_path=sweep.root / "configs" / f"{key}.yaml",
                    out_dir=out, is_source=is_source, needs_source=needs_source)  # fmt: skip


def expand(sweep: Sweep, world_size: int | None = None) -> list[SweepRun]:
    """Every run of the sweep (the source first), each validated; raises :class:`SweepError`
    naming the run and field on the first bad one. ``world_size`` also checks that each
    batch divides over that many ranks."""
    runs: list[SweepRun] = []
    src_run = None
    if sweep.source is not None:
        inherited = {k: copy.deepcopy(sweep.base[k]) for k in _SOURCE_INHERITS if k in sweep.base}
        scfg = _merge(_merge(inherited, {"model": {"mixer": "attention", "attention_layers": "none"},
                                         "init": {"kind": "scratch"}}), sweep.source)  # fmt: skip
        src_name = str(scfg.pop("name", None) or "source")
        src_run = _finish(sweep, scfg, src_name, is_source=True)
        runs.append(src_run)
    seen: dict[str, str] = {}
    for combo in itertools.product(*[list(zip(a.labels, a.values)) for a in sweep.axes]):
        overrides: dict[str, Any] = {}
        for _, vals in combo:
            overrides.update(vals)
        name = "-".join(lab for lab, _ in combo if lab) or sweep.name
        run = _finish(sweep, _apply(sweep.base, overrides), name)
        if run.needs_source:
            # the source's export path is part of what the run computes: hash it in
            run.config["init"]["source"] = str(src_run.out_dir / "hf")
            from .config import load_run_config

            rc = load_run_config(run.config)
            run = _placed(sweep, rc.to_dict(), name, rc.content_hash(), False, True)
        if run.id in seen:
            raise SweepError(f"runs {seen[run.id]} and {name} have identical configs (id {run.id}); "
                             "an axis changes nothing the run computes")  # fmt: skip
        seen[run.id] = name
        runs.append(run)
    names = [r.name for r in runs]
    for r in runs:  # duplicate readable names: disambiguated by the key's hash anyway
        if names.count(r.name) > 1:
            r.name = r.key
    if world_size:
        from .config import ConfigError, load_run_config

        for r in runs:
            try:
                load_run_config(r.config).batch_layout(world_size)
            except ConfigError as e:
                raise SweepError(f"run {r.name}: {e}") from None
    return runs


def write_configs(runs: list[SweepRun]) -> None:
    """Write each run's config YAML (``configs/<key>.yaml``)."""
    for r in runs:
        r.config_path.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(r.config, sort_keys=False)
        if not r.config_path.is_file() or r.config_path.read_text() != text:
            r.config_path.write_text(text)


# -- the index -----------------------------------------------------------------------------
_INDEX_FIELDS = ("id", "name", "key", "config", "out_dir", "state", "returncode", "started", "finished", "pid")


class Index:
    """``sweep.json`` + ``index.csv`` in the sweep root: one record per run."""

    def __init__(self, sweep: Sweep, runs: list[SweepRun]):
        self.root = sweep.root
        self.path = self.root / "sweep.json"
        old = {}
        if self.path.is_file():
            try:
                old = {r["key"]: r for r in json.loads(self.path.read_text()).get("runs", [])}
            except (json.JSONDecodeError, KeyError, TypeError):
                old = {}
        self.name = sweep.name
        self.file = str(sweep.path) if sweep.path else None
        self.records: dict[str, dict] = {}
        for r in runs:
            rec = {k: None for k in _INDEX_FIELDS}
            rec.update(old.get(r.key, {}))
            rec.update(id=r.id, name=r.name, key=r.key, config=str(r.config_path), out_dir=str(r.out_dir))
            rec["state"] = run_state(r, rec)
            self.records[r.key] = rec

    def update(self, run: SweepRun, **kw: Any) -> None:
        self.records[run.key].update(kw)
        self.save()

    def save(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"name": self.name, "file": self.file, "runs": list(self.records.values())}, indent=1))
        tmp.replace(self.path)
        with open(self.root / "index.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=_INDEX_FIELDS)
            w.writeheader()
            w.writerows(self.records.values())


def _alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
        return True
    except (TypeError, ValueError, ProcessLookupError, PermissionError):
        return False


def run_state(run: SweepRun, rec: dict | None = None) -> str:
    """``done`` (DONE written), ``running`` (recorded as running by a live process),
    ``failed`` (a launch ended without DONE) or ``pending``."""
    if (run.out_dir / "DONE").is_file():
        return "done"
    rec = rec or {}
    if rec.get("state") == "running" and _alive(rec.get("pid")):
        return "running"
    if rec.get("state") in ("running", "failed") or rec.get("returncode") not in (None, 0):
        return "failed"
    return "pending"


def run_progress(out_dir: Path) -> tuple[int, float | None]:
    """(steps done, last validation loss) from a run's metrics.jsonl."""
    steps, val = 0, None
    p = Path(out_dir) / "metrics.jsonl"
    if p.is_file():
        for line in p.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line
            steps = row.get("step", steps)
            if row.get("val_loss") is not None:
                val = row["val_loss"]
    return steps, val


# -- running -------------------------------------------------------------------------------
def _merge_opts(defaults: LaunchOptions, cli: LaunchOptions) -> LaunchOptions:
    d = asdict(defaults)
    for k, v in asdict(cli).items():
        if v not in (None, []):
            d[k] = v
    return LaunchOptions(**d)


def slot_options(opts: LaunchOptions, slot: int, max_parallel: int, n_devices: int) -> LaunchOptions:
    """Launch options of concurrent slot ``slot``: its own master port and, on a GPU node,
    its own ``--include localhost:<devices>`` block of ``num_gpus`` devices."""
    if max_parallel <= 1:
        return opts
    o = LaunchOptions(**asdict(opts))
    o.master_port = (opts.master_port or 29500) + slot
    if n_devices and not opts.hostfile:
        per = opts.num_gpus or 1
        if per * max_parallel > n_devices:
            raise SweepError(f"--max-parallel {max_parallel} x {per} GPUs per run needs {per * max_parallel} "
                             f"devices; this node has {n_devices}")  # fmt: skip
        o.include = "localhost:" + ",".join(str(slot * per + i) for i in range(per))
        o.num_gpus = None
    return o


def _cuda_devices() -> int:
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return len([x for x in vis.split(",") if x.strip()])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
        return len([x for x in out.stdout.splitlines() if x.startswith("GPU")])
    except (OSError, subprocess.SubprocessError):
        return 0


def stop_process_group(proc: subprocess.Popen, grace: float = 20.0, first: int = signal.SIGTERM) -> int:
    """Stop a launcher started with ``start_new_session``: ``first`` to its whole process group,
    SIGKILL after ``grace`` seconds. Returns the exit code."""
    for sig, wait in ((first, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


def run_sweep(sweep: Sweep, opts: LaunchOptions | None = None, *, max_parallel: int = 1, dry_run: bool = False,
              out: TextIO | None = None, poll: float = 0.5, progress_every: float = 20.0) -> int:  # fmt: skip
    """Launch every unfinished run (the source first); returns 0 if all are done, 130 if
    interrupted (Ctrl-C), 1 if a run failed. ``out``: progress lines (default stdout)."""
    out = out or sys.stdout
    opts = _merge_opts(sweep.launch, opts or LaunchOptions())
    world = (opts.num_gpus or 0) * (opts.num_nodes or 1) if not opts.include else None
    runs = expand(sweep, world_size=world or None)  # everything validated before anything starts
    if max_parallel < 1:
        raise SweepError("--max-parallel must be >= 1")
    n_dev = _cuda_devices() if max_parallel > 1 else 0
    if dry_run:
        for slot, r in enumerate(runs):
            cmd = deepspeed_command(r.config_path, slot_options(opts, slot % max_parallel, max_parallel, n_dev))
            state = "done" if (r.out_dir / "DONE").is_file() else "todo"
            print(f"# {r.name} [{r.id}] {state}", file=out)
            print(shlex.join(cmd), file=out)
        return 0
    write_configs(runs)
    index = Index(sweep, runs)
    index.save()
    (sweep.root / "logs").mkdir(parents=True, exist_ok=True)
    todo = [r for r in runs if index.records[r.key]["state"] != "done"]
    for r in runs:
        if r not in todo:
            print(f"[sweep] {r.name}: done, skipped", file=out)
    source = next((r for r in runs if r.is_source), None)
    active: dict[int, tuple[SweepRun, subprocess.Popen, Any]] = {}
    failed: list[str] = []
    interrupted = False
    next_report = time.monotonic() + progress_every

    def launch(r: SweepRun, slot: int) -> None:
        cmd = deepspeed_command(r.config_path, slot_options(opts, slot, max_parallel, n_dev))
        log = open(sweep.root / "logs" / f"{r.key}.log", "a")
        log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n")
        log.flush()
        resumed = (r.out_dir / "checkpoints").is_dir()
        print(f"[sweep] {r.name}: {'resuming' if resumed else 'starting'} (log {log.name})", file=out, flush=True)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=train_env(), start_new_session=True)
        index.update(r, state="running", pid=proc.pid, started=time.strftime("%Y-%m-%dT%H:%M:%S"),
                     finished=None, returncode=None)  # fmt: skip
        active[slot] = (r, proc, log)

    def reap(slot: int, rc: int) -> None:
        r, proc, log = active.pop(slot)
        log.close()
        done = rc == 0 and (r.out_dir / "DONE").is_file()
        index.update(r, state="done" if done else "failed", returncode=rc, pid=None,
                     finished=time.strftime("%Y-%m-%dT%H:%M:%S"))  # fmt: skip
        steps, val = run_progress(r.out_dir)
        msg = f"done ({steps} steps, val loss {val})" if done else f"FAILED (exit code {rc}; see {log.name})"
        print(f"[sweep] {r.name}: {msg}", file=out, flush=True)
        if not done:
            failed.append(r.name)

    old_int = signal.getsignal(signal.SIGINT)

    def on_int(signum, frame):  # the first Ctrl-C stops the runs, a second one is a plain KeyboardInterrupt
        nonlocal interrupted
        interrupted = True
        signal.signal(signal.SIGINT, old_int)

    signal.signal(signal.SIGINT, on_int)
    try:
        while (todo or active) and not interrupted:
            if source is not None and source.name in failed:
                for r in [r for r in todo if r.needs_source]:  # their source failed: they cannot run
                    print(f"[sweep] {r.name}: skipped (the source run failed)", file=out)
                    failed.append(r.name)
                    todo.remove(r)
            for slot in range(max_parallel):
                if slot in active or not todo or interrupted:
                    continue
                # the source is first in line; runs that need its export wait until it is done
                src_busy = source is not None and index.records[source.key]["state"] != "done"
                ready = [r for r in todo if not (r.needs_source and src_busy)]
                if not ready:
                    break
                todo.remove(ready[0])
                launch(ready[0], slot)
            for slot, (r, proc, _) in list(active.items()):
                rc = proc.poll()
                if rc is not None:
                    reap(slot, rc)
            if active and time.monotonic() >= next_report:  # runs log to files: show progress here
                next_report = time.monotonic() + progress_every
                for r, _, _ in active.values():
                    steps, val = run_progress(r.out_dir)
                    print(f"[sweep] {r.name}: step {steps}" + (f", val loss {val:.3f}" if val is not None else ""),
                          file=out, flush=True)  # fmt: skip
            if active:
                time.sleep(poll)
    finally:
        if active:
            print("[sweep] interrupted: stopping the running runs (their last checkpoints survive)", file=out, flush=True)
        for slot, (r, proc, _) in list(active.items()):
            reap(slot, stop_process_group(proc, first=signal.SIGINT))
        signal.signal(signal.SIGINT, old_int)
    if interrupted:
        print("[sweep] interrupted; rerun the same command to continue", file=out)
        return 130
    if failed:
        print(f"[sweep] {len(failed)} run(s) failed: {', '.join(failed)}", file=out)
        return 1
    print(f"[sweep] all {len(runs)} runs done; index: {index.path}", file=out)
    return 0


def status_rows(sweep: Sweep) -> list[dict]:
    """One row per run: name, id, state, steps, last val loss, return code, out_dir."""
    runs = expand(sweep)
    index = Index(sweep, runs)
    rows = []
    for r in runs:
        rec = index.records[r.key]
        steps, val = run_progress(r.out_dir)
        rows.append({"name": r.name, "id": r.id, "state": rec["state"], "steps": steps, "val_loss": val,
                     "returncode": rec["returncode"], "out_dir": str(r.out_dir)})  # fmt: skip
    return rows


def format_table(rows: list[dict], cols: list[str]) -> str:
    cells = [[("-" if row[c] is None else f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c])) for c in cols]
             for row in rows]  # fmt: skip
    widths = [max(len(c), *(len(x[i]) for x in cells)) if cells else len(c) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
    lines += ["  ".join(x.ljust(w) for x, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


# -- CLI -----------------------------------------------------------------------------------
def add_cli(subparsers) -> argparse.ArgumentParser:
    """Register ``xatl-ds sweep run|status``."""
    p = subparsers.add_parser("sweep", help="expand a sweep YAML into runs and launch them",
                              description="Scaling sweeps: a grid of run configs launched through deepspeed.")  # fmt: skip
    sub = p.add_subparsers(dest="sweep_command", required=True, metavar="SUBCOMMAND")
    r = sub.add_parser("run", help="launch every unfinished run (finished ones are skipped, broken ones resume)")
    r.add_argument("file", help="sweep YAML")
    r.add_argument("--dry-run", action="store_true", help="print the deepspeed command of every run and exit")
    r.add_argument("--max-parallel", type=int, default=1,
                   help="concurrent runs (distinct master ports; on GPUs distinct --include device blocks)")  # fmt: skip
    add_opts_cli(r)
    r.set_defaults(func=_cli_run)
    s = sub.add_parser("status", help="table of runs: state, steps done, last val loss")
    s.add_argument("file", help="sweep YAML")
    s.set_defaults(func=_cli_status)
    return p


def _cli_run(args: argparse.Namespace) -> int:
    from .launch import opts_from_args

    try:
        sweep = load_sweep(args.file)
        return run_sweep(sweep, opts_from_args(args), max_parallel=args.max_parallel, dry_run=args.dry_run)
    except SweepError as e:
        print(f"xatl-ds sweep: {e}", file=sys.stderr)
        return 2


def _cli_status(args: argparse.Namespace) -> int:
    try:
        rows = status_rows(load_sweep(args.file))
    except SweepError as e:
        print(f"xatl-ds sweep: {e}", file=sys.stderr)
        return 2
    print(format_table(rows, ["name", "id", "state", "steps", "val_loss", "returncode"]))
    counts = {s: sum(r["state"] == s for r in rows) for s in STATES}
    print(", ".join(f"{n} {s}" for s, n in counts.items()))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m xatl_ds.sweep run|status FILE`` (the same as ``xatl-ds sweep``)."""
    from .cli import subcommand_main

    return subcommand_main("sweep", argv)

if __name__ == "__main__":
    sys.exit(main())
