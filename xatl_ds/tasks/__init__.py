"""Local lm-eval tasks built from a prepared dataset's held-out test split (no network).

``build_tasks(DATA_DIR)`` reads ``DATA_DIR/test.jsonl`` (raw text units that were never
tokenized into train or val) and writes ``DATA_DIR/tasks/``: one jsonl per task, one task
YAML per task (``dataset_path: json`` pointing at the jsonl by absolute path) and
``build.json``. That folder is an lm-eval ``include_path``. See README.md beside this file.

Everything is a pure function of test.jsonl and the builder settings: the same dataset gives
byte-identical task files, so scores of different runs on the same dataset are comparable.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["LOCAL_TASKS", "TaskBuildConfig", "TaskBuildError", "build_tasks", "split_sentences", "TEMPLATE_DIR"]

TEMPLATE_DIR = Path(__file__).resolve().parent
LOCAL_TASKS = ("xatl_lastword", "xatl_nextsent")
#: bump when the construction changes (it is recorded in build.json and the task files)
BUILDER_VERSION = 1


class TaskBuildError(ValueError):
    """The dataset cannot give the local tasks (missing test.jsonl, too little text)."""


@dataclass(frozen=True)
class TaskBuildConfig:
    """How the local tasks are cut from the held-out units."""

    #: a last-word passage grows sentence by sentence until it has at least this many characters
    lastword_min_chars: int = 300
    #: ... and is dropped if it gets longer than this (long poems without sentence ends)
    lastword_max_chars: int = 1200
    #: minimum context of a next-sentence example, in characters (whole sentences)
    nextsent_min_context_chars: int = 200
    #: at most this many sentences of context
    nextsent_max_context_sentences: int = 6
    #: an answer sentence (true or distractor) has this many characters ...
    sentence_min_chars: int = 20
    #: ... up to this many
    sentence_max_chars: int = 300
    #: wrong choices per next-sentence example (4 choices in all)
    n_distractors: int = 3
    #: cap on examples per task (a hash-ordered, deterministic subset beyond it)
    max_examples: int = 1000
    #: seed of the distractor draw and the position of the true sentence
    seed: int = 1234


# a sentence ends at . ! ? (plus closing quotes/brackets) before whitespace, or at a blank line
_SENT_END = re.compile(r"[.!?][\"'\)\]]*(?=\s)|[.!?][\"'\)\]]*$|\n[ \t]*\n")
_ABBREV = {"mr", "mrs", "ms", "dr", "st", "sr", "jr", "no", "vs", "viz", "etc", "ch", "vol"}
_LAST_WORD = re.compile(r"(\s+)([A-Za-z][A-Za-z']*[A-Za-z])[^A-Za-z0-9]*$")


def split_sentences(text: str) -> list[tuple[int, int]]:
    """(start, end) character spans of the sentences of ``text``; leading whitespace of a
    sentence belongs to the gap before it, so ``text[s:e]`` starts with a non-space."""
    spans, start = [], 0
    for m in _SENT_END.finditer(text):
        if text[m.start()] == ".":
            w = re.search(r"([A-Za-z]+)$", text[max(0, m.start() - 5): m.start()])
            if w and (w.group(1).lower() in _ABBREV or len(w.group(1)) == 1 and w.group(1).isupper()):
                continue  # "Mr. Perry", "J. Smith": not a sentence end
        end = m.end() if text[m.start()] in ".!?" else m.start()
        seg = text[start:end]
        lead = len(seg) - len(seg.lstrip())
        if seg.strip():
            spans.append((start + lead, start + len(seg.rstrip())))
        start = m.end()
    seg = text[start:]
    if seg.strip():
        lead = len(seg) - len(seg.lstrip())
        spans.append((start + lead, start + len(seg.rstrip())))
    return spans


def _is_prose(sentence: str, cfg: TaskBuildConfig) -> bool:
    s = sentence.strip()
    return cfg.sentence_min_chars <= len(s) <= cfg.sentence_max_chars and len(s.split()) >= 4


def _lastword_examples(units: list[dict], cfg: TaskBuildConfig) -> list[dict]:
    out = []
    for u, unit in enumerate(units):
        text = unit["text"]
        spans = split_sentences(text)
        i = 0
        while i < len(spans):
            j, start = i, spans[i][0]
            while j < len(spans) and spans[j][1] - start < cfg.lastword_min_chars:
                j += 1
            if j >= len(spans):
                break
            end = spans[j][1]
            passage = text[start:end]
            m = _LAST_WORD.search(passage)
            if m and len(passage) <= cfg.lastword_max_chars and len(passage[: m.start()].split()) >= 20:
                out.append({
                    "context": passage[: m.start(1)], "target": passage[m.start(1): m.end(2)],
                    "word": m.group(2), "unit": u, "source": unit.get("source", ""),
                })  # fmt: skip
            i = j + 1  # passages never overlap
    return out


def _nextsent_examples(units: list[dict], cfg: TaskBuildConfig) -> list[dict]:
    cands = []  # (unit, context, answer)
    for u, unit in enumerate(units):
        text = unit["text"]
        spans = split_sentences(text)
        first = 0
        for i in range(1, len(spans)):
            if i < first + 1:
                continue
            k = i - 1
            while k > first and spans[i - 1][1] - spans[k][0] < cfg.nextsent_min_context_chars:
                k -= 1
            k = max(k, i - cfg.nextsent_max_context_sentences)
            context = text[spans[k][0]: spans[i - 1][1]]
            answer = text[spans[i][0]: spans[i][1]]
            if len(context) >= cfg.nextsent_min_context_chars and _is_prose(answer, cfg):
                cands.append((u, context, answer))
                first = i + 1  # the next example's context starts after this answer
    pool = [(u, a) for u, _, a in cands]
    out = []
    for n, (u, context, answer) in enumerate(cands):
        rng = random.Random(f"{cfg.seed}:{n}:{answer}")
        others = [a for (v, a) in pool if v != u and a != answer]
        if len(set(others)) < cfg.n_distractors:  # too few units: allow other passages of this one
            others = [a for (v, a) in pool if a != answer and a not in context]
        others = sorted(set(others))
        if len(others) < cfg.n_distractors:
            continue
        choices = rng.sample(others, cfg.n_distractors)
        label = rng.randrange(cfg.n_distractors + 1)
        choices.insert(label, answer)
        out.append({"context": context, "choices": choices, "label": label, "unit": u,
                    "source": units[u].get("source", "")})  # fmt: skip
    return out


def _cap(examples: list[dict], n: int) -> list[dict]:
    """At most ``n`` examples: those with the smallest content hash, kept in original order
    (a deterministic subset spread over all sources)."""
    if len(examples) <= n:
        return examples

    def key(ix: int) -> str:
        return hashlib.blake2b(json.dumps(examples[ix], sort_keys=True).encode(), digest_size=8).hexdigest()

    keep = sorted(sorted(range(len(examples)), key=key)[:n])
    return [examples[i] for i in keep]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_tasks(data_dir: str | Path, out_dir: str | Path | None = None, cfg: TaskBuildConfig | None = None,
                force: bool = False) -> Path:  # fmt: skip
    """Build the local tasks from ``data_dir/test.jsonl`` into ``out_dir`` (default
    ``data_dir/tasks``) and return that folder (an lm-eval include path). A folder already
    built from the same test.jsonl with the same settings is reused as is."""
    cfg = cfg or TaskBuildConfig()
    data_dir = Path(data_dir)
    test = data_dir / "test.jsonl"
    if not test.is_file():
        raise TaskBuildError(
            f"{test} does not exist: the local tasks are built from a prepared dataset's held-out split; "
            "run `xatl-ds data prepare --out DIR` (with --test-frac > 0) or pass the dataset dir with --data"
        )
    out = Path(out_dir) if out_dir is not None else data_dir / "tasks"
    stamp = {"builder_version": BUILDER_VERSION, "test_sha256": _sha256(test), "config": asdict(cfg)}
    marker = out / "build.json"
    if not force and marker.is_file():
        try:
            old = json.loads(marker.read_text())
        except json.JSONDecodeError:
            old = {}
        if {k: old.get(k) for k in stamp} == stamp and all((out / f"{t}.yaml").is_file() for t in LOCAL_TASKS):
            return out
    units = [json.loads(line) for line in test.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not units:
        raise TaskBuildError(f"{test} holds no text units; prepare the dataset with --test-frac > 0")
    built = {
        "xatl_lastword": _cap(_lastword_examples(units, cfg), cfg.max_examples),
        "xatl_nextsent": _cap(_nextsent_examples(units, cfg), cfg.max_examples),
    }
    for name, ex in built.items():
        if not ex:
            raise TaskBuildError(
                f"{test} ({len(units)} units) gives no {name} examples; prepare more held-out text "
                "(a larger --test-frac or --max-chars)"
            )
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, ex in built.items():
        data = out / f"{name}.jsonl"
        data.write_text("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in ex), encoding="utf-8")
        template = (TEMPLATE_DIR / f"{name}.yaml").read_text()
        yaml_text = template.replace("@DATA_FILE@", str(data.resolve()).replace("\\", "/"))
        (out / f"{name}.yaml").write_text(yaml_text)
        counts[name] = len(ex)
    marker.write_text(json.dumps({**stamp, "data_dir": str(data_dir.resolve()), "examples": counts}, indent=1))
    return out
