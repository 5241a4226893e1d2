"""Local lm-eval tasks built from a prepared dataset's held-out test split (no network).

``build_tasks(DATA_DIR)`` reads ``DATA_DIR/test.jsonl`` (raw text units that were never
tokenized into train or val) and writes ``DATA_DIR/tasks/``: one jsonl per task, one task
YAML per task (``dataset_path: json`` pointing at the jsonl by absolute path) and
``build.json``. That folder is an lm-eval ``include_path``. See README.md beside this file.

Everything is a pure function of test.jsonl and the builder settings: the same dataset gives
byte-identical task files, so scores of different runs on the same dataset are comparable.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["LOCAL_TASKS", "TaskBuildConfig", "TaskBuildError", "build_tasks", "split_sentences", "TEMPLATE_DIR"]

TEMPLATE_DIR = Path(__file__).resolve().parent
LOCAL_TASKS = ("xatl_lastword", "xatl_nextsent", "xatl_minpairs")
#: bump when the construction changes (it is recorded in build.json and the task files)
BUILDER_VERSION = 2


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
    #: a minimal-pair sentence has at least this many words (and the sentence_*_chars bounds)
    minpairs_min_words: int = 6
    #: a replacement word is drawn among the words of the same length equally frequent, or when
    #: fewer, among this many nearest in frequency (on the more or less frequent side, at random)
    minpairs_freq_neighbours: int = 8
    #: seed of the distractor draw, the minimal-pair edits and the position of the true sentence
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


# a word: letters with inner apostrophes ("don't"); a minimal-pair edit touches lowercase words only
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*")


class _FrequencyNeighbours:
    """Lowercase words of the held-out text by length and frequency. ``sides(w)``: the words
    of ``w``'s length at most / at least as frequent as ``w``: all equally frequent ones, and
    when they are fewer than ``k``, the nearest others up to ``k``. A replacement is drawn from
    one side picked at random, so a word-frequency scorer prefers the real word about as often
    as the replacement."""

    def __init__(self, texts: list[str], k: int):
        self.count: dict[str, int] = {}
        lower: set[str] = set()  # words seen in lowercase form (no names, no sentence-initial-only words)
        for t in texts:
            for m in _WORD.finditer(t):
                w = m.group()
                self.count[w.lower()] = self.count.get(w.lower(), 0) + 1
                if w.islower():
                    lower.add(w)
        self.by_len: dict[int, list[tuple[int, str]]] = {}
        for w in lower:
            self.by_len.setdefault(len(w), []).append((self.count[w], w))
        for v in self.by_len.values():
            v.sort()
        self.k = k

    def sides(self, w: str) -> tuple[range, range]:
        """Index ranges into ``by_len[len(w)]`` (they include ``w`` itself; a range of length
        < 2 holds no other word). Ranges, not lists: rare words share groups of thousands."""
        pool = self.by_len.get(len(w), [])
        c = self.count.get(w, 0)
        lo, hi = bisect.bisect_left(pool, c, key=lambda x: x[0]), bisect.bisect_right(pool, c, key=lambda x: x[0])
        n = max(0, self.k - (hi - lo - 1))  # the nearest less / more frequent words that make up k
        return range(max(0, lo - n), hi), range(lo, min(len(pool), hi + n))

    def draw(self, w: str, side: range, rng: random.Random) -> str:
        pool = self.by_len[len(w)]
        while True:  # w is in the range once and the range holds another word: this ends
            x = pool[rng.choice(side)][1]
            if x != w:
                return x


def _swap(sentence: str, rng: random.Random) -> str | None:
    """The sentence with two adjacent lowercase words (only whitespace between them) swapped."""
    ws = list(_WORD.finditer(sentence))
    cands = [i for i in range(len(ws) - 1)
             if ws[i].group().islower() and ws[i + 1].group().islower() and ws[i].group() != ws[i + 1].group()
             and sentence[ws[i].end(): ws[i + 1].start()].isspace()]  # fmt: skip
    if not cands:
        return None
    i = rng.choice(cands)
    a, b = ws[i], ws[i + 1]
    return sentence[: a.start()] + b.group() + sentence[a.end(): b.start()] + a.group() + sentence[b.end():]


def _replace(sentence: str, rng: random.Random, freq: _FrequencyNeighbours) -> str | None:
    """The sentence with one lowercase word replaced by a word of the same length and similar
    frequency in the held-out text."""
    ws = [m for m in _WORD.finditer(sentence) if m.group().islower() and len(m.group()) >= 2]
    opts = [(m, freq.sides(m.group())) for m in ws]
    opts = [(m, sides) for m, sides in opts if len(sides[0]) > 1 and len(sides[1]) > 1]  # both directions possible
    if not opts:
        return None
    m, sides = rng.choice(opts)
    return sentence[: m.start()] + freq.draw(m.group(), sides[rng.randrange(2)], rng) + sentence[m.end():]


def _minpairs_examples(units: list[dict], cfg: TaskBuildConfig) -> list[dict]:
    freq = _FrequencyNeighbours([u["text"] for u in units], cfg.minpairs_freq_neighbours)
    sents: list[tuple[int, str]] = []
    for u, unit in enumerate(units):
        text = unit["text"]
        sents.extend((u, text[a:b]) for a, b in split_sentences(text))
    attested = {s for _, s in sents}
    out, seen = [], set()
    for n, (u, sent) in enumerate(sents):
        if sent in seen or not _is_prose(sent, cfg) or len(_WORD.findall(sent)) < cfg.minpairs_min_words:
            continue
        seen.add(sent)
        rng = random.Random(f"{cfg.seed}:minpairs:{n}:{sent}")
        kinds = ["swap", "replace"]
        rng.shuffle(kinds)
        for kind in kinds:
            fake = _swap(sent, rng) if kind == "swap" else _replace(sent, rng, freq)
            if fake is not None and fake != sent and fake not in attested:
                break
        else:
            continue
        label = rng.randrange(2)
        choices = [fake, sent] if label else [sent, fake]
        out.append({"context": "", "choices": choices, "label": label, "sentence": sent, "kind": kind, "unit": u,
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
        "xatl_minpairs": _cap(_minpairs_examples(units, cfg), cfg.max_examples),
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
