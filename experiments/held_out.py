"""What the comparison commands (`compare`, `compare-bytes`) score on test data, short or long.

At context 0: per-window NLL on the study's short test windows (`promote.seq_len` tokens).
At a context of N tokens (objectives.long_context): per-document NLL of the late position bucket
of held-out long test documents of N tokens, and passkey retrieval on the test prompts of the
study's [long_context] lengths up to N, one outcome per prompt. Both are paired across the
models compared (the same documents, the same prompts), so differences get paired intervals.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from objectives.data import TEST_SPLIT, TextSpec, token_windows
from objectives.evaluate import window_nlls
from objectives.long_context import LongContextConfig, late_window_nlls, long_windows, passkey
from search.config import StudyConfig


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

    @classmethod
    def of(cls, config: StudyConfig, tokenizer, windows: int, context: int = 0) -> HeldOutScoring:
        if context:
            long_config = long_config_at(config.long_context, context, windows)
            texts = long_windows(tokenizer, "test", context, windows)
        else:
            long_config = config.long_context
            spec = TextSpec(TEST_SPLIT, config.promote.seq_len, windows)
            texts = token_windows(tokenizer, spec)
        return cls(tokenizer, context, texts, long_config, config.promote.seq_len)

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

    def retrieved(self, model: nn.Module) -> list[bool]:
        """Per passkey test prompt, whether the key was retrieved (long context only)."""
        if not self.context:
            raise ValueError("passkey retrieval is scored at a long context only")
        return list(passkey(model, self.tokenizer, "test", self.long_config)["outcomes"])

    def describe(self, count: int) -> str:
        """What the per-window NLLs are, for a report."""
        if self.context:
            return (
                f"late-position perplexity ({self.positions}) of {count} held-out long test "
                f"documents of {self.context} tokens, and passkey retrieval on test prompts"
            )
        return f"perplexity on {count} x {self.seq_len} test tokens"
