"""lm-eval bridge: evaluate a finished run's ``hf/`` export, write ``RUN_DIR/eval.json``.

``xatl-ds eval RUN_DIR [--tasks ...]`` and :func:`evaluate_run` run lm-eval's
``simple_evaluate`` on an in-process :class:`XatlLM` (an ``HFLM`` subclass). Default tasks
are the local ones built from the run's dataset (``xatl_ds/tasks``, no network);
``--tasks paper`` gives the paper's six benchmarks (their data must be downloadable or cached).

lm-eval's own CLI: lm-eval finds model classes only in its registry and loads no plugins, so
run it through this module, which registers the ``xatl`` model class first::

    python -m xatl_ds.evaluate --model xatl --model_args pretrained=RUN_DIR/hf \\
        --tasks xatl_lastword --include_path DATA_DIR/tasks

(any ``lm_eval`` argument works; ``import xatl_ds.evaluate`` in your own script does the same).

Padding: XatlForCausalLM's recurrent mixers need right padding. HFLM right-pads
loglikelihood batches and passes no attention mask (padding only follows the scored tokens of
a causal model), so loglikelihood and multiple-choice tasks batch freely; generation, which
HFLM left-pads, runs one request at a time for XatlForCausalLM.
"""
from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .monitor import bars_off
from .rundir import RunDir
from .tasks import LOCAL_TASKS, TaskBuildError, build_tasks

__all__ = ["PAPER_TASKS", "EvalError", "XatlLM", "evaluate_run", "resolve_tasks", "summarize_results",
           "format_summary", "lm_eval_main"]  # fmt: skip

PAPER_TASKS = ("lambada_openai", "hellaswag", "piqa", "arc_easy", "arc_challenge", "winogrande")
_ALIASES = {"paper": PAPER_TASKS, "local": LOCAL_TASKS, "default": LOCAL_TASKS}


class EvalError(RuntimeError):
    """Evaluation cannot run; the message names the task / path and the fix."""


# -- the lm-eval model class ------------------------------------------------------------------
def _register() -> None:
    """Register ``xatl`` with lm-eval as a lazy "module:Class" placeholder (idempotent; the
    placeholder resolves to this module even when it runs as ``__main__``)."""
    from lm_eval.api.registry import model_registry

    target = "xatl_ds.evaluate:XatlLM"
    current = model_registry._objs.get("xatl")  # noqa: SLF001 (no public "is registered" query)
    if current is None:
        model_registry.register("xatl", target=target)


def _lm_class():
    from lm_eval.models.huggingface import HFLM

    class XatlLM(HFLM):
        """HFLM for XatlForCausalLM exports (and any native HF causal LM, e.g. GPT-NeoX).

        ``pretrained`` may be an ``hf/`` dir or a run dir holding one. Defaults:
        ``trust_remote_code=False`` (XatlForCausalLM is registered with AutoModelForCausalLM
        by ``import xatl_ds.models``), device ``cuda`` when available else ``cpu``, tokenizer padding
        on the right.
        """

        def __init__(self, pretrained: Any = None, **kwargs: Any) -> None:
            import torch

            import xatl_ds.models  # noqa: F401  (registers XatlConfig / XatlForCausalLM with the Auto classes)

            if isinstance(pretrained, (str, os.PathLike)):
                p = Path(pretrained)
                if not (p / "config.json").is_file() and (p / "hf" / "config.json").is_file():
                    pretrained = str(p / "hf")
                elif p.exists() and not (p / "config.json").is_file():
                    raise EvalError(f"{p} holds no model (config.json); pass a run's hf/ export or a run dir")
                else:
                    pretrained = str(pretrained)
            kwargs.setdefault("trust_remote_code", False)
            kwargs.setdefault("backend", "causal")  # XatlConfig is not in transformers' causal-LM name list
            if kwargs.get("device") is None:
                kwargs["device"] = "cuda" if torch.cuda.is_available() else "cpu"
            if kwargs.get("batch_size") is None:
                kwargs["batch_size"] = 1
            if bars_off():  # transformers' weight-loading bar follows its own switch
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
            super().__init__(pretrained=pretrained, **kwargs)
            self.tokenizer.padding_side = "right"

        @property
        def is_recurrent(self) -> bool:
            """True for XatlForCausalLM (right padding only)."""
            return type(self.model).__name__ == "XatlForCausalLM"

        # lm-eval passes ``disable=`` to tqdm explicitly, which beats tqdm's own TQDM_DISABLE: honour it here
        def loglikelihood(self, requests, disable_tqdm: bool = False):  # noqa: D401
            """HFLM's, its progress bars off under ``TQDM_DISABLE``."""
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm or bars_off())

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):  # noqa: D401
            """HFLM's, its progress bars off under ``TQDM_DISABLE``."""
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or bars_off())

        def generate_until(self, requests, disable_tqdm: bool = False):  # noqa: D401
            """HFLM left-pads generation batches; recurrent mixers reject that, so generate one
            request at a time (no padding at all)."""
            disable_tqdm = disable_tqdm or bars_off()
            if not self.is_recurrent:
                return super().generate_until(requests, disable_tqdm=disable_tqdm)
            outs: list[str] = []
            for r in requests:  # (zero-arg super() does not work inside a comprehension before 3.12)
                outs.extend(super().generate_until([r], disable_tqdm=True))
            return outs

    XatlLM.__module__ = __name__
    XatlLM.__qualname__ = "XatlLM"
    return XatlLM


_register()  # cheap (lm-eval's registry module only): `import xatl_ds.evaluate` makes --model xatl work


def __getattr__(name: str):
    # built lazily so that importing this module (e.g. for the CLI) does not import lm-eval/torch
    if name == "XatlLM":
        cls = _lm_class()
        globals()["XatlLM"] = cls
        return cls
    raise AttributeError(name)


# -- tasks ---------------------------------------------------------------------------------------
def resolve_tasks(spec: str | Sequence[str] | None) -> list[str]:
    """Task names from ``"t1,t2"`` / a list; ``paper`` expands to the paper's six, ``local``
    (and None) to the local tasks. Order kept, duplicates dropped."""
    if spec is None:
        items: list[str] = list(LOCAL_TASKS)
    else:
        items = [t.strip() for t in (spec.split(",") if isinstance(spec, str) else spec) if t and t.strip()]
        if not items:
            raise EvalError("--tasks is empty; give task names, 'paper' or 'local'")
    out: list[str] = []
    for t in items:
        for name in _ALIASES.get(t, (t,)):
            if name not in out:
                out.append(name)
    return out


def _scan_builtin_task_names(names: set[str]) -> set[str]:
    """Which of ``names`` lm-eval's bundled task YAMLs define (as task, group or tag), by a text
    scan: building lm-eval's full index takes ~30 s, this a fraction of a second."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    found: set[str] = set()
    pat = re.compile(r"^\s*(?:-\s*)?(?:task|group|tag)?:?\s*['\"]?([\w\-.]+)['\"]?\s*$")
    for path in root.rglob("*.yaml"):
        try:
            text = path.read_text(encoding="utf-8", errors="ignore")
        except OSError:
            continue
        if not any(n in text for n in names):
            continue
        for line in text.splitlines():
            m = pat.match(line)
            if m and m.group(1) in names:
                found.add(m.group(1))
    return found


def _load_tasks(names: list[str], include_paths: list[Path]) -> tuple[Any, list[Any]]:
    """A TaskManager and the loaded Task/Group objects, one per name, with errors that name
    the task: unknown names, and data that cannot be fetched (offline)."""
    from lm_eval.tasks import TaskManager

    local_hint = (
        f"local tasks (no network): {', '.join(LOCAL_TASKS)} (the default of `xatl-ds eval`), or add a folder "
        "of task YAMLs with --include-path"
    )
    inc = [str(p) for p in include_paths]
    tm = TaskManager(include_path=inc or None, include_defaults=False)
    missing = [n for n in names if n not in tm.all_tasks]
    if missing:
        builtin = _scan_builtin_task_names(set(missing))
        unknown = [n for n in missing if n not in builtin]
        if unknown:
            raise EvalError(f"unknown lm-eval task(s) {unknown}: not in lm-eval {_lm_eval_version()} nor in "
                            f"{inc or 'any include path'}; {local_hint}")  # fmt: skip
        tm = TaskManager(include_path=inc or None, include_defaults=True)
    objs = []
    for n in names:
        try:
            loaded = tm.load([n])
        except Exception as e:  # noqa: BLE001  (datasets raises many kinds: ConnectionError, OfflineModeIsEnabled, ...)
            raise EvalError(
                f"task {n!r} could not load its data ({type(e).__name__}: {str(e)[:300]}). Its dataset must be "
                f"downloaded from the HF hub (offline?) or be in the datasets cache; {local_hint}"
            ) from e
        groups = loaded["groups"]
        objs.extend([groups[n]] if n in groups else list(loaded["tasks"].values()))
    return tm, objs


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


# -- results -------------------------------------------------------------------------------------
def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if v == v else None  # NaN -> None


def summarize_results(results: dict) -> dict[str, dict]:
    """lm-eval's result dict -> ``{task: {metrics: {m: {value, stderr}}, n_samples, version,
    higher_is_better}}`` (filter suffixes such as ``,none`` dropped when there is one filter)."""
    out: dict[str, dict] = {}
    for task, res in results.get("results", {}).items():
        metrics: dict[str, dict] = {}
        for key, val in res.items():
            if key == "alias" or "_stderr," in key or "," not in key:
                continue
            metric, filt = key.split(",", 1)
            name = metric if filt == "none" else f"{metric},{filt}"
            metrics[name] = {"value": _num(val), "stderr": _num(res.get(f"{metric}_stderr,{filt}"))}
        ns = results.get("n-samples", {}).get(task, {})
        out[task] = {
            "metrics": metrics,
            "n_samples": ns.get("effective", ns.get("original")),
            "n_samples_total": ns.get("original"),
            "version": results.get("versions", {}).get(task),
            "higher_is_better": results.get("higher_is_better", {}).get(task, {}),
        }
    return out


def _run_data_dir(rd: RunDir) -> Path | None:
    """The dataset a run trained on (its config)."""
    try:
        p = (rd.read_config().get("data") or {}).get("path")
    except ValueError as e:
        raise EvalError(str(e)) from None
    return Path(p) if p else None


def evaluate_run(
    run_dir: str | Path,
    tasks: str | Sequence[str] | None = None,
    *,
    data_dir: str | Path | None = None,
    include_path: str | Path | Sequence[str | Path] | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    device: str | None = None,
    model_args: dict | None = None,
    bootstrap_iters: int = 1000,
    force: bool = False,
) -> dict:
    """Evaluate ``run_dir/hf`` on ``tasks`` and write ``run_dir/eval.json``; return its content.

    ``tasks``: names, ``"paper"`` or ``"local"`` (default: the local tasks, built from the run's
    dataset or ``data_dir``). Skipped (the existing eval.json is returned) when eval.json holds
    the same tasks with the same ``limit``, unless ``force``. ``model_args`` go to
    :class:`XatlLM` (e.g. ``{"dtype": "bfloat16"}``).
    """
    rd = RunDir(run_dir)
    run_dir = rd.path
    hf = rd.hf if rd.hf.is_dir() else run_dir
    if not (hf / "config.json").is_file():
        state = "still training" if rd.metrics.is_file() else "not a run directory"
        raise EvalError(f"{run_dir} has no hf/ export ({state}); evaluate finished runs (with a DONE file)")
    names = resolve_tasks(tasks)
    if not force:
        try:
            old = rd.eval()
        except ValueError as e:
            raise EvalError(f"{e} (or pass --force)") from None
        # a group (e.g. mmlu) reports its subtasks too: every requested name must have a result
        same = sorted(old.get("requested_tasks", [])) == sorted(names) and set(names) <= set(old.get("tasks", {}))
        if same and old.get("limit") == limit:
            return old
    includes = [Path(p) for p in ([include_path] if isinstance(include_path, (str, Path)) else include_path or [])]
    for p in includes:
        if not p.is_dir():
            raise EvalError(f"--include-path {p} is not a directory of task YAMLs")
    task_dir = None
    if any(n in LOCAL_TASKS for n in names):
        ddir = Path(data_dir) if data_dir is not None else _run_data_dir(rd)
        if ddir is None:
            raise EvalError(f"{run_dir}: no meta.json/config.yaml names the dataset; pass --data DATA_DIR")
        try:
            task_dir = build_tasks(ddir)
        except TaskBuildError as e:
            raise EvalError(str(e)) from None
        includes = [task_dir, *includes]

    os.environ.setdefault("DISABLE_MULTIPROC", "1")  # lm-eval's bootstrap otherwise forks a pool per metric
    from lm_eval import simple_evaluate

    _register()
    tm, task_objs = _load_tasks(names, includes)
    lm = _lm_class_cached()(pretrained=str(hf), batch_size=batch_size, device=device, **(model_args or {}))
    t0 = time.perf_counter()
    res = simple_evaluate(model=lm, tasks=task_objs, task_manager=tm, limit=limit, bootstrap_iters=bootstrap_iters,
                          log_samples=False, batch_size=batch_size)  # fmt: skip
    if res is None:  # non-zero rank of a distributed lm-eval run
        return {}
    summary = {
        "run_dir": str(run_dir.resolve()), "model": str(hf.resolve()),
        "model_class": type(lm.model).__name__, "requested_tasks": names, "limit": limit,
        "tasks": summarize_results(res), "lm_eval_version": _lm_eval_version(),
        "task_dir": str(task_dir) if task_dir else None, "include_paths": [str(p) for p in includes],
        "batch_size": batch_size, "device": str(lm.device), "eval_seconds": round(time.perf_counter() - t0, 2),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }  # fmt: skip
    rd.write_json(RunDir.EVAL, summary)
    return summary


def _lm_class_cached():
    return globals()["XatlLM"] if "XatlLM" in globals() else __getattr__("XatlLM")


def format_summary(summary: dict) -> list[str]:
    """One line per task: ``task (n=N): metric value ± stderr, ...``."""
    lines = []
    for task, r in summary.get("tasks", {}).items():
        ms = ", ".join(
            f"{m} {v['value']:.4g}" + (f" ± {v['stderr']:.2g}" if v["stderr"] is not None else "")
            for m, v in r["metrics"].items() if v["value"] is not None
        )  # fmt: skip
        lines.append(f"{task} (n={r['n_samples']}): {ms}")
    return lines


def lm_eval_main(argv: Sequence[str] | None = None) -> None:
    """lm-eval's own CLI with the ``xatl`` model registered (``python -m xatl_ds.evaluate ...``)."""
    _register()
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    lm_eval_main()
