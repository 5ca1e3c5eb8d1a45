"""What the comparison commands (`compare`, `compare-bytes`) score on test data, short or long.

At context 0: per-window NLL on the study's short test windows (`promote.seq_len` tokens).
At a context of N tokens (objectives.long_context): per-document NLL of the late position bucket
of held-out long test documents of N tokens, and passkey retrieval on the test prompts of the
study's [long_context] lengths up to N, one outcome per prompt. Both are paired across the
models compared (the same documents, the same prompts), so differences get paired intervals.
When the study selects by those two (`[selection]` of `long_ppl` and `passkey`), the per-document
NLLs and the per-prompt NLLs of the keys are the terms of its objective, paired the same way.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from objectives.data import TEST_SPLIT, TextSpec, token_windows
from objectives.evaluate import PPL_TASK, window_nlls
from objectives.long_context import LongContextConfig, late_window_nlls, long_windows, passkey
from objectives.selection import SelectionObjective
from search.config import StudyConfig

OBJECTIVE_TERMS = ("long_ppl", "passkey")  # the selection terms held-out scoring measures


def long_config_at(config: LongContextConfig, context: int, windows: int) -> LongContextConfig:
    """The study's long-context settings at `context` tokens: `windows` documents, the late bucket
    from half the context unless the study's edges fit, prompt lengths up to it."""
    lengths = tuple(n for n in config.lengths if n <= context) or (context,)
    return config.with_seq_len(context, ppl_windows=windows, lengths=lengths)


@dataclass
class HeldOutScoring:
    """A study's test windows at one context (0: short), and how to score a model on them."""

    tokenizer: object
    context: int
    windows: torch.Tensor
    long_config: LongContextConfig
    seq_len: int
    selection: SelectionObjective

    @classmethod
    def of(cls, config: StudyConfig, tokenizer, windows: int, context: int = 0) -> HeldOutScoring:
        if context:
            long_config = long_config_at(config.long_context, context, windows)
            texts = long_windows(tokenizer, "test", context, windows)
        else:
            long_config = config.long_context
            spec = TextSpec(TEST_SPLIT, config.promote.seq_len, windows)
            texts = token_windows(tokenizer, spec)
        return cls(tokenizer, context, texts, long_config, config.promote.seq_len, config.selection)

    @property
    def suffix(self) -> str:
        """Appended to cached result names: results at another context are other results."""
        return f"_c{self.context}" if self.context else ""

    @property
    def positions(self) -> str:
        return f"{self.long_config.buckets[-1]}-{self.long_config.seq_len - 1}"

    def nlls(self, model: nn.Module) -> np.ndarray:
        """(windows,) mean NLL per window: the whole short window, or a document's late bucket."""
        if self.context:
            return np.asarray(late_window_nlls(model, self.windows, self.long_config))
        return np.asarray(window_nlls(model, self.windows, progress=False))

    def retrieval(self, model: nn.Module) -> dict[str, list]:
        """Per passkey test prompt, whether the key was retrieved (`passkey`) and the mean NLL of
        its tokens (`passkey_nll`), long context only."""
        if not self.context:
            raise ValueError("passkey retrieval is scored at a long context only")
        result = passkey(model, self.tokenizer, "test", self.long_config)
        return {"passkey": list(result["outcomes"]), "passkey_nll": list(result["answer_nlls"])}

    @property
    def objective_weights(self) -> dict[str, float] | None:
        """The study's selection objective when what is scored here measures it: at a long
        context, late-position perplexity (`long_ppl`) and the keys' NLL (`passkey`); at 0, the
        short-window perplexity. None when it reads another task."""
        weights = dict(self.selection.weights)
        if not self.context:
            return weights if self.selection.is_short_ppl else None
        return weights if set(weights) <= set(OBJECTIVE_TERMS) else None

    @property
    def objective_name(self) -> str | None:
        """The objective as a product of perplexities, e.g. "long_ppl^1 * passkey^1"."""
        weights = self.objective_weights if self.context else None
        return " * ".join(f"{t}^{w:g}" for t, w in weights.items()) if weights else None

    def objective_terms(self, nlls: Sequence[float], retrieval: dict | None) -> dict[str, list]:
        """Per-item NLLs of each of the objective's terms, for objectives.significance."""
        weights = self.objective_weights or {}
        terms = {PPL_TASK: list(nlls), "long_ppl": list(nlls)}
        if retrieval is not None:
            terms["passkey"] = retrieval["passkey_nll"]
        return {t: terms[t] for t in weights if t in terms}

    def objective_value(self, terms: dict[str, list]) -> float:
        """The objective, exp(sum_t w_t mean_t), from `objective_terms`."""
        weights = self.objective_weights or {}
        return math.exp(sum(w * statistics.fmean(terms[t]) for t, w in weights.items()))

    def describe(self, count: int) -> str:
        """What the per-window NLLs are, for a report."""
        if self.context:
            return (
                f"late-position perplexity ({self.positions}) of {count} held-out long test "
                f"documents of {self.context} tokens, and passkey retrieval on test prompts"
            )
        return f"perplexity on {count} x {self.seq_len} test tokens"
