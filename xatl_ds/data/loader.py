"""Loading prepared shards for training.

:class:`PackedTokens` memory-maps one split. :meth:`PackedTokens.get_batch` is a pure function
of ``(step, micro_step, rank, ...)``: a resumed run sees exactly the batches it would have
seen. :meth:`PackedTokens.iter_eval_batches` gives a fixed slice of val, split over ranks;
:func:`global_mean_loss` all-reduces the per-rank sums. :meth:`PackedTokens.check_fits` tells
before training whether a sequence length fits the split.

Integrity (:func:`verify_shard`, run whenever a split is opened): the size of every shard is
compared with meta.json each time (a stat); the sha256 (against ``content_sha256``) and the
largest token id (which must be < ``vocab_size``) need a full read, so they are established
once per *file identity* and remembered in a stamp beside the shard,
``.SPLIT.bin.verified.json``, keyed by the file's size, mtime and inode. prepare writes that
stamp itself from what it just wrote, so a fresh dataset is never re-read; any rewrite, copy
or truncation changes the identity and triggers one full read (~700 MiB/s measured on a busy 2-core machine). It
does not re-detect media corruption that leaves size and mtime alone, after a file's first
check. Where the directory is read-only the stamp cannot be written and each process checks
once.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import DataError
from .layout import FORMAT_VERSION, META_FILE, SHARD_SPLITS, TEST_FILE, check_complete, read_meta, shard_file

logger = logging.getLogger(__name__)

_STAMP_VERSION = 1
# read size of the full check: a multiple of every token itemsize, so chunks hold whole ids
_SCAN_CHUNK = 1 << 23
# checks done in this process, (file, size, mtime_ns, inode, expected sha256) -> max id: covers
# read-only dataset dirs and saves re-reading the stamp
_checked: dict[tuple[str, int, int, int, str], int] = {}


@dataclass(frozen=True)
class ShardCheck:
    """What one full read of a shard found, and the file identity it stays valid for."""

    size: int
    mtime_ns: int
    inode: int
    sha256: str
    #: the largest token id in the shard; -1 for an empty shard
    max_id: int

    def holds_for(self, st: os.stat_result, sha256: str) -> bool:
        """Whether this check still describes a file with stat ``st`` expected to hash to ``sha256``."""
        return (self.size, self.mtime_ns, self.inode, self.sha256) == (st.st_size, st.st_mtime_ns, st.st_ino, sha256)


def _stamp_file(shard: Path) -> Path:
    return shard.with_name(f".{shard.name}.verified.json")


def _scan(shard: Path, dtype: np.dtype) -> tuple[str, int]:
    """sha256 and largest id of a shard, in one sequential read."""
    h = hashlib.sha256()
    max_id = -1
    with open(shard, "rb") as f:
        # a buffered read returns short only at EOF, so every chunk but the last is whole ids
        while chunk := f.read(_SCAN_CHUNK):
            h.update(chunk)
            ids = np.frombuffer(chunk, dtype=dtype, count=len(chunk) // dtype.itemsize)
            if ids.size:
                max_id = max(max_id, int(ids.max()))
    return h.hexdigest(), max_id


def _read_stamp(path: Path) -> ShardCheck | None:
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
        if raw.pop("version", None) != _STAMP_VERSION:
            return None
        return ShardCheck(**raw)
    except (OSError, ValueError, TypeError, AttributeError):  # missing, corrupt or old: check again
        return None


def record_shard_check(shard: Path, sha256: str, max_id: int, st: os.stat_result | None = None) -> ShardCheck:
    """Write the stamp saying ``shard`` (as of stat ``st``, default: now) hashes to ``sha256``
    and holds ids up to ``max_id``. prepare calls it for the shards it has just written."""
    st = shard.stat() if st is None else st
    check = ShardCheck(st.st_size, st.st_mtime_ns, st.st_ino, sha256, max_id)
    stamp = _stamp_file(shard)
    tmp = stamp.with_name(f"{stamp.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"version": _STAMP_VERSION, **asdict(check)}, f)
        os.replace(tmp, stamp)  # atomic: concurrent ranks never read half a stamp
    except OSError as e:
        logger.info("cannot record the check of %s (%s): each process will re-check it", shard, e)
        tmp.unlink(missing_ok=True)
    return check


def verify_shard(data_dir: str | os.PathLike, split: str, meta: dict[str, Any] | None = None) -> ShardCheck:
    """Check ``DIR/SPLIT.bin`` against meta.json: size, sha256 and id range (see the module
    docstring for when the full read happens). Raises :class:`DataError` naming the file and
    the fix."""
    data_dir = Path(data_dir)
    meta = read_meta(data_dir) if meta is None else meta
    shard = shard_file(data_dir, split)
    fix = f"re-run xatl-ds data prepare --out {data_dir} --overwrite with the same arguments"
    check_complete(data_dir, meta)
    expected = (meta.get("content_sha256") or {}).get(shard.name)
    if not isinstance(expected, str):
        raise DataError(f"{data_dir / META_FILE} records no content_sha256 for {shard.name}: {fix}")
    st = shard.stat()  # before any read: a change during the read must not be stamped as checked
    key = (str(shard.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, expected)
    if key in _checked:
        check = ShardCheck(st.st_size, st.st_mtime_ns, st.st_ino, expected, _checked[key])
    else:
        check = _read_stamp(_stamp_file(shard))
        if check is None or not check.holds_for(st, expected):
            sha, max_id = _scan(shard, np.dtype(meta["dtype"]))
            if sha != expected:
                raise DataError(
                    f"{shard} is corrupted or was modified after prepare: its sha256 {sha[:16]}... differs from "
                    f"content_sha256 {expected[:16]}... in {META_FILE}; {fix}"
                )
            check = record_shard_check(shard, sha, max_id, st)
        _checked[key] = check.max_id
    vocab = int(meta["vocab_size"])
    if check.max_id >= vocab:
        raise DataError(
            f"{shard} holds token id {check.max_id} but {META_FILE} says vocab_size={vocab}, so the model's "
            f"embedding has no row for it: the shard and meta.json do not belong together; {fix}"
        )
    return check


class PackedTokens:
    """One split (``train`` or ``val``) of a prepared dataset as a read-only token memmap.

    The stream is cut into non-overlapping windows of ``seq_len`` tokens (``window w`` =
    ``tokens[w*seq_len:(w+1)*seq_len]``; the tail shorter than a window is never used).
    Windows may straddle an EOS: documents are packed, as in GPT-style pretraining.
    Opening it runs :func:`verify_shard` on the split (``self.check`` holds the result).
    """

    def __init__(self, path: str | os.PathLike, split: str = "train"):
        if split not in SHARD_SPLITS:
            raise DataError(
                f"split={split!r}: use 'train' or 'val' (the test split is raw text in {TEST_FILE}, for eval tasks)"
            )
        self.path = Path(path)
        self.meta = read_meta(self.path)
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{self.path}: format_version {self.meta.get('format_version')} != {FORMAT_VERSION}: "
                f"re-run xatl-ds data prepare --out {self.path} --overwrite"
            )
        self.check = verify_shard(self.path, split, self.meta)
        self.split = split
        self.dtype = np.dtype(self.meta["dtype"])
        self.n_tokens = int(self.meta["splits"][split]["tokens"])
        file = shard_file(self.path, split)
        # np.memmap refuses empty files
        self.tokens = np.memmap(file, dtype=self.dtype, mode="r") if self.n_tokens else np.zeros(0, self.dtype)
        self._perms: dict[tuple[int, int, int], np.ndarray] = {}

    def __len__(self) -> int:
        return self.n_tokens

    def __repr__(self) -> str:
        return (
            f"PackedTokens({str(self.path)!r}, split={self.split!r}, tokens={self.n_tokens}, dtype={self.dtype.name})"
        )

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_token_id(self) -> int:
        return int(self.meta["eos_token_id"])

    def num_windows(self, seq_len: int) -> int:
        """How many non-overlapping ``seq_len`` windows the split holds."""
        if seq_len < 1:
            raise DataError(f"seq_len={seq_len}: must be >= 1")
        return self.n_tokens // seq_len

    def check_fits(self, seq_len: int, eval_batches: int | None = None, micro: int = 1) -> int:
        """Fail now, with the numbers and the fix, if ``seq_len`` does not fit this split.

        Call it before training: the train split needs one window of ``seq_len`` tokens for
        :meth:`get_batch`, the val split one for :meth:`iter_eval_batches` (which would
        otherwise fail at the first evaluation). ``eval_batches`` (``eval.batches``; None: all
        windows) and ``micro`` (the micro-batch size) give the windows an evaluation asks for;
        a val split holding fewer is usable and only logged. Returns the windows a pass covers:
        all of train, or what one evaluation sees.
        """
        for name, v in (("seq_len", seq_len), ("micro", micro)):
            if int(v) != v or v < 1:
                raise DataError(f"check_fits: {name}={v!r} must be an integer >= 1")
        if eval_batches is not None and (int(eval_batches) != eval_batches or eval_batches < 1):
            raise DataError(f"check_fits: eval_batches={eval_batches!r} must be an integer >= 1 or None")
        n = self.num_windows(seq_len)
        if self.split == "train":
            if n == 0:
                raise DataError(
                    f"{self.path}: the train split holds {self.n_tokens} tokens, fewer than one window of "
                    f"data.seq_len={seq_len}: lower data.seq_len to <= {self.n_tokens} or prepare more text"
                )
            return n
        if n == 0:
            frac = (self.meta.get("split_fractions") or {}).get("val")
            raise DataError(
                f"{self.path}: the val split holds {self.n_tokens} tokens, fewer than one window of "
                f"data.seq_len={seq_len}, so evaluation would fail: lower data.seq_len to <= {self.n_tokens}, "
                f"or re-run xatl-ds data prepare --overwrite with a larger --val-frac (now {frac}) or more text"
            )
        covered = self.eval_windows(micro, seq_len, eval_batches)
        if eval_batches is not None and covered < eval_batches * micro:
            logger.warning(
                "%s: val holds %d windows of %d tokens; an evaluation asks for eval.batches=%d x micro=%d = %d "
                "and covers %d", self.path, n, seq_len, eval_batches, micro, eval_batches * micro, covered,
            )
        return covered

    def _windows(self, idx: np.ndarray, seq_len: int):
        import torch

        offsets = idx.astype(np.int64)[:, None] * seq_len + np.arange(seq_len, dtype=np.int64)[None, :]
        return torch.from_numpy(np.asarray(self.tokens[offsets], dtype=np.int64))

    def _perm(self, seed: int, epoch: int, n: int) -> np.ndarray:
        key = (seed, epoch, n)
        perm = self._perms.get(key)
        if perm is None:
            perm = np.random.default_rng([seed, epoch, n]).permutation(n)
            if len(self._perms) >= 2:  # a batch spans at most two epochs
                self._perms.pop(next(iter(self._perms)))
            self._perms[key] = perm
        return perm

    def get_batch(
        self,
        step: int,
        micro_step: int,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        *,
        grad_accum: int = 1,
    ):
        """The ``(batch_size, seq_len)`` LongTensor of input ids for one micro-batch of one rank.

        A pure function of its arguments. Global sample ``g = ((step * grad_accum + micro_step)
        * world_size + rank) * batch_size + b`` is window ``perm_e[g % n]`` of epoch
        ``e = g // n``, where ``perm_e`` is a permutation of the ``n`` windows seeded by
        ``(seed, e)``: ranks and micro-steps never share a window within an epoch, each epoch
        visits every window once in a new order, and each optimizer step sees the same set of
        windows whatever the split of its global batch into ranks x micro-steps.
        """
        for name, v, lo in (("step", step, 0), ("micro_step", micro_step, 0), ("batch_size", batch_size, 1),
                            ("seq_len", seq_len, 1), ("rank", rank, 0), ("world_size", world_size, 1),
                            ("seed", seed, 0), ("grad_accum", grad_accum, 1)):  # fmt: skip
            if int(v) != v or v < lo:
                raise DataError(f"get_batch: {name}={v!r} must be an integer >= {lo}")
        if rank >= world_size:
            raise DataError(f"get_batch: rank={rank} must be < world_size={world_size}")
        if micro_step >= grad_accum:
            raise DataError(
                f"get_batch: micro_step={micro_step} >= grad_accum={grad_accum}: pass grad_accum=<gradient "
                "accumulation steps> so micro-batches of one step get distinct windows"
            )
        n = self.num_windows(seq_len)
        if n == 0:
            raise DataError(
                f"{self.path} {self.split}: {self.n_tokens} tokens hold no window of seq_len={seq_len}; "
                "lower seq_len or prepare more text"
            )
        g0 = ((step * grad_accum + micro_step) * world_size + rank) * batch_size
        g = np.arange(g0, g0 + batch_size, dtype=np.int64)
        epochs, pos = g // n, g % n
        idx = np.empty(batch_size, dtype=np.int64)
        for e in np.unique(epochs):
            m = epochs == e
            idx[m] = self._perm(seed, int(e), n)[pos[m]]
        return self._windows(idx, seq_len)

    def eval_windows(self, batch_size: int, seq_len: int, max_batches: int | None = None) -> int:
        """Number of windows the evaluation covers in total (over all ranks)."""
        n = self.num_windows(seq_len)
        return n if max_batches is None else min(n, max_batches * batch_size)

    def iter_eval_batches(
        self, batch_size: int, seq_len: int, max_batches: int | None = None, rank: int = 0, world_size: int = 1
    ) -> Iterator[Any]:
        """Fixed evaluation batches: the first ``min(num_windows, max_batches * batch_size)``
        windows in stream order (all windows when ``max_batches`` is None), dealt round-robin to
        ranks (window ``i`` -> rank ``i % world_size``) and yielded in batches of up to
        ``batch_size``. The covered windows do not depend on ``world_size``, so the mean loss
        from :func:`global_mean_loss` is comparable across runs. Ranks may get one batch fewer
        than others: reduce once at the end, not per batch.
        """
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"iter_eval_batches: batch_size={batch_size}, rank={rank}, world_size={world_size} invalid")
        if max_batches is not None and max_batches < 1:
            raise DataError(f"iter_eval_batches: max_batches={max_batches} must be >= 1 or None")
        total = self.eval_windows(batch_size, seq_len, max_batches)
        if total == 0:
            raise DataError(
                f"{self.path} {self.split}: {self.n_tokens} tokens hold no window of seq_len={seq_len}; "
                "lower seq_len or prepare with a larger --val-frac"
            )
        mine = np.arange(rank, total, world_size, dtype=np.int64)
        for s in range(0, mine.size, batch_size):
            yield self._windows(mine[s : s + batch_size], seq_len)


def global_mean_loss(loss_sum: float, count: float, device: Any = None) -> float:
    """``sum(loss_sum) / sum(count)`` over all ranks (all-reduce when torch.distributed is up).

    ``loss_sum`` is a rank's summed token losses and ``count`` its number of predicted tokens;
    ``device`` must suit the backend (CUDA for NCCL, CPU for gloo).
    """
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(loss_sum), float(count)], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    if t[1].item() <= 0:
        raise DataError("global_mean_loss: no tokens were evaluated on any rank")
    return float(t[0].item() / t[1].item())
