"""What validation selects by: short-window perplexity, long-context perplexity, retrieval, or a
weighted mix of them.

Stage 2 ranks and prunes candidates, and the byte front chooses each family's point, by one
number computed on validation data (and the front reports the same number on test data):

    value = exp( sum_t  w_t * loss_t )

with loss_ppl = log(perplexity on the study's short windows) and, for a scored task t
(objectives.long_context: long_ppl, passkey, mdqa), its "loss": for long_ppl the mean NLL of the
last position bucket, for passkey and mdqa the mean NLL of the answer tokens. Every loss is an
NLL in nats, so the value is a weighted geometric mean of perplexities: with the default weights
{ppl: 1} it is the short perplexity itself; with {long_ppl: 1} the perplexity of positions
[last bucket edge, seq_len) of held-out long documents; {long_ppl: 1, passkey: 1} multiplies that
by the perplexity of the keys' digits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from objectives.evaluate import PPL_TASK, SCORED_TASKS, perplexity
from objectives.long_context import LongContextConfig


@dataclass(frozen=True)
class SelectionObjective:
    """Task -> weight (`ppl` or a scored task) and the long tasks' settings."""

    weights: tuple[tuple[str, float], ...] = ((PPL_TASK, 1.0),)
    long_context: LongContextConfig = field(default_factory=LongContextConfig)

    def __post_init__(self) -> None:
        allowed = [PPL_TASK, *sorted(SCORED_TASKS)]
        if not self.weights:
            raise ValueError(f"the selection objective needs at least one of: {', '.join(allowed)}")
        for task, weight in self.weights:
            if task not in allowed:
                raise ValueError(
                    f"unknown selection task {task!r}; valid tasks: {', '.join(allowed)}"
                )
            if not weight > 0:
                raise ValueError(f"selection weight of {task!r} must be positive, got {weight}")

    @classmethod
    def of(cls, weights: Mapping[str, float], long_context: LongContextConfig | None = None):
        return cls(tuple(sorted(weights.items())), long_context or LongContextConfig())

    @property
    def is_short_ppl(self) -> bool:
        """Whether the value is the short-window perplexity (the default)."""
        return self.weights == ((PPL_TASK, 1.0),)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(task for task, _ in self.weights)

    def describe(self) -> str:
        """A stable name: "ppl", or e.g. "long_ppl+passkey@2048/4:1024,2048x2" (what a stored
        measurement was made with; a changed objective is measured anew)."""
        if self.is_short_ppl:
            return PPL_TASK
        terms = "+".join(task if w == 1 else f"{w:g}*{task}" for task, w in self.weights)
        lc = self.long_context
        return (
            f"{terms}@{lc.seq_len}/{lc.ppl_windows}:{','.join(map(str, lc.lengths))}"
            f"x{lc.trials}:{','.join(f'{d:g}' for d in lc.depths)}"
        )

    def value(
        self, model: nn.Module, tokenizer, subset: str, ppl_windows: torch.LongTensor | None
    ) -> float:
        """The objective on `subset` ("valid" or "test"); `ppl_windows` are the short windows of
        that subset (needed only when `ppl` has a weight)."""
        if self.is_short_ppl:
            return perplexity(model, ppl_windows, progress=False).perplexity
        total = 0.0
        for task, weight in self.weights:
            if task == PPL_TASK:
                loss = math.log(perplexity(model, ppl_windows, progress=False).perplexity)
            else:
                result = SCORED_TASKS[task](
                    model, tokenizer, subset=subset, config=self.long_context, progress=False
                )
                loss = result["loss"]
            total += weight * loss
        return math.exp(total)
