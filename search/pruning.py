"""Stage-2 pruning per budget: Optuna's pruners, each candidate compared only with its own budget.

Stage 2 recovers candidates in rungs (the merged model, then after each recovery method) and
reports validation perplexity at each (`trial.report`). A 1.5-KV-heads candidate must not be cut
because 2-KV-heads candidates are better, so `BudgetPruner` hands the wrapped pruner a view of the
study holding only the trials of the same budget (the `budget` user attribute). Baselines and the
source model report too, so candidates compete with them, but are never pruned (the caller skips
`should_prune` for them).
"""

from __future__ import annotations

import optuna
from optuna.pruners import BasePruner, MedianPruner, NopPruner, SuccessiveHalvingPruner
from optuna.trial import FrozenTrial

PRUNER_FACTORIES = {
    # Rungs are recovery steps 1, 2, ...: promotion is checked from the first recovery on.
    "successive_halving": lambda eta: SuccessiveHalvingPruner(
        min_resource=1, reduction_factor=eta, min_early_stopping_rate=0
    ),
    "median": lambda eta: MedianPruner(n_startup_trials=2, n_warmup_steps=1),
    "none": lambda eta: NopPruner(),
}


class _BudgetView:
    """A study seen through one budget: `get_trials` keeps that budget's trials only."""

    def __init__(self, study: optuna.Study, budget: object):
        self._study = study
        self._budget = budget

    def get_trials(self, deepcopy: bool = True, states=None) -> list[FrozenTrial]:
        trials = self._study.get_trials(deepcopy=deepcopy, states=states)
        return [t for t in trials if t.user_attrs.get("budget") == self._budget]

    def __getattr__(self, name: str):
        return getattr(self._study, name)


class BudgetPruner(BasePruner):
    """Wraps a pruner so that a trial competes only with trials of its own budget."""

    def __init__(self, inner: BasePruner):
        self.inner = inner

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        return self.inner.prune(_BudgetView(study, trial.user_attrs.get("budget")), trial)


def make_pruner(name: str, reduction_factor: int = 2) -> BudgetPruner:
    if name not in PRUNER_FACTORIES:
        raise ValueError(f"unknown pruner {name!r} (available: {', '.join(PRUNER_FACTORIES)})")
    return BudgetPruner(PRUNER_FACTORIES[name](reduction_factor))
