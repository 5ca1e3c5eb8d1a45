"""The two-stage search study, on Optuna storage (resumable, shared by any number of workers).

Stage 1 (cheap): each Optuna trial chooses a budget, a strategy with its hyper-parameters and
whether to allocate the budget across layers; the strategy proposes a grouping, which is scored
by the proxy. Trials store the canonical grouping (JSON), its KV bytes and proxy value in
`user_attrs`; the value Optuna minimises is the proxy relative to the first baseline at the same
budget (so budgets compete fairly for trials), or (proxy, KV bytes) with objective = "pareto". Neighbour (and neighbour_kv) at every budget are enqueued as baselines. A grouping
already scored is not scored again (its value is copied). A global cap on trials holds across
processes: trial numbers are allocated atomically by the storage, and a trial runs only while
fewer than `trials` live trials (complete or running) have smaller numbers.

Stage 2 (expensive): the top-k groupings per budget by proxy, the baselines and the source model
are enqueued as work items in a second Optuna study `<name>:stage2` of the same storage.
Waiting trials are claimed atomically by the storage, so no candidate is evaluated twice; each is
converted, recovered and evaluated, and its results land in the trial's `user_attrs`.

Resumption: a trial left RUNNING by a dead process on this machine (found by host and pid) is
marked failed and its work re-enqueued; across machines Optuna's heartbeat does the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import optuna
import torch
from optuna.trial import TrialState
from tqdm.auto import tqdm

import gqa
from gqa.grouping import Grouping
from gqa.models import LoadedModel, load_model
from objectives.calibration import calibrate
from objectives.data import TEST_SPLIT, VALID_SPLIT, TextSpec, token_windows
from objectives.evaluate import SCORED_TASKS, evaluate
from objectives.proxies import make_proxy
from objectives.recovery import recover, recovery_config
from objectives.recovery.layerwise import stats_fingerprint
from search.budget import Budget, allocate, allocate_kv_together, error_curves
from search.candidate_cache import CandidateCache
from search.config import KV_TOGETHER, StudyConfig
from search.pruning import make_pruner
from search.storage import make_storage
from search.strategies import SearchContext, make_strategy, with_partition

log = logging.getLogger(__name__)
STAGE2_SUFFIX = ":stage2"
WORKER = f"{socket.gethostname()}:{os.getpid()}"
SCORE_WAIT_S = 120.0  # longest wait for another worker scoring the same grouping
FAULT_ENV = "HEADGROUP_FAULT"  # test hook: "stage1:N" or "stage2:N" kills this process mid-trial


def grouping_key(grouping: Grouping) -> str:
    return hashlib.sha1(grouping.to_json().encode()).hexdigest()[:16]


def _fault(stage: str, count: int) -> None:
    spec = os.environ.get(FAULT_ENV, "")
    if spec and spec == f"{stage}:{count}":
        os.kill(os.getpid(), 9)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_dead_trials(study: optuna.Study) -> int:
    """Fail RUNNING trials whose worker process on this host has died; re-enqueue their work."""
    host = socket.gethostname()
    revived = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker", "")
        name, _, pid = worker.rpartition(":")
        if name != host or not pid.isdigit() or _pid_alive(int(pid)):
            continue
        study.tell(trial.number, state=TrialState.FAIL)
        attrs = {k: v for k, v in trial.user_attrs.items() if k in ("item", "item_key", "budget")}
        study.enqueue_trial(trial.params, user_attrs={**attrs, "retry_of": trial.number})
        revived += 1
    if revived:
        log.info("re-enqueued %d trial(s) of dead workers in %s", revived, study.study_name)
    return revived


@dataclass
class StudyResult:
    stage1_complete: int
    stage2_complete: int
    seconds: float


class Study:
    """A configured study bound to its storage; `run()` does whatever work is left."""

    def __init__(
        self, config: StudyConfig, progress: bool = True, loaded: LoadedModel | None = None
    ):
        self.config = config
        self.progress = progress
        self.storage = make_storage(config.storage)
        self.loaded = loaded or load_model(config.model)
        self.source = self.loaded.model
        if torch.cuda.is_available():  # the study works where the model fits: GPU when there is one
            self.source.to("cuda")
        self.adapter = gqa.get_adapter(self.source)
        heads = self.adapter.num_heads
        for budget in config.search.budgets:
            if budget > heads:
                raise ValueError(
                    f"search.budgets: {budget} KV heads per layer exceeds the {heads} query heads"
                )
        for group in config.precision.group_sizes if config.precision.budgets else ():
            if self.adapter.head_dim % group:  # refused before any work, not after stage 2
                raise ValueError(
                    f"precision.group_sizes: {group} does not divide head_dim "
                    f"{self.adapter.head_dim}"
                )
        self.source_grouping = gqa.current_grouping(self.source)
        self._stats = None
        self._proxy = None
        self._rank_proxy = None
        self._ctx = None
        self._valid_windows = None
        self._curves: dict[str, dict[str, list[list[float]]]] = {}

    # -- shared state ------------------------------------------------------------------------

    @property
    def stats(self):
        if self._stats is None:
            self._stats = calibrate(
                self.source,
                self.loaded.tokenizer,
                self.config.calibration,
                self.config.model,
                self.progress,
            )
        return self._stats

    @property
    def proxy(self):
        if self._proxy is None:
            search = self.config.search
            budget = search.table_budget_gb
            self._proxy = make_proxy(
                search.proxy,
                self.source,
                self.stats,
                search.merge,
                table_budget=None if budget is None else int(budget * 2**30),
                tokenizer=self.loaded.tokenizer,
                long_config=self.config.long_context,
            )
        return self._proxy

    @property
    def rank_proxy(self):
        """The proxy that ranks trials and re-ranks strategies' candidates (None: the guide)."""
        name = self.config.search.rank_proxy
        if name and self._rank_proxy is None:
            self._rank_proxy = make_proxy(
                name,
                self.source,
                self.stats,
                self.config.search.merge,
                recovery=self.config.promote.recovery_config.get("layerwise"),
                tokenizer=self.loaded.tokenizer,
                long_config=self.config.long_context,
            )
        return self._rank_proxy

    def context(self) -> SearchContext:
        if self._ctx is None:  # one context: strategies memoise features in it
            self._ctx = SearchContext.from_model(self.source, proxy=self.proxy, stats=self.stats)
            self._ctx.reranker = self.rank_proxy
            self._ctx.rerank_top = self.config.search.rerank_top
        return self._ctx

    def budget(self, average: float, allocation: bool | str) -> Budget:
        """The per-layer group counts of a trial: `average` spread evenly (allocation False), or
        allocated by error curves: True gives each layer its K and V counts from totals of
        average * L each; "kv" (search.config.KV_TOGETHER) lets the curves also choose how the
        2 * average * L cached heads divide between K and V."""
        layers = self.adapter.num_layers
        spread = Budget.from_average(layers, average)
        if not allocation:
            return spread
        apart = allocation == KV_TOGETHER
        curves = self._error_curves(apart)
        if apart:
            return allocate_kv_together(curves["k"], curves["v"], spread.total)
        return allocate(curves["k"], curves["v"], sum(spread.k), sum(spread.v))

    def _error_curves(self, apart: bool) -> dict[str, list[list[float]]]:
        """Per-layer error curves for K and for V, computed once per study and kind of curve.

        Without a rank proxy: the guide proxy's curves of greedy partitions, K and V apart. With
        one: what its score leaves of each layer's best coarsening of the source (end to end),
        for a partition shared by K and V, or (`apart`) for K alone and V alone, the other kind
        as in the source."""
        rank = self.rank_proxy
        key = "apart" if apart and rank is not None else "shared"
        if key in self._curves:
            return self._curves[key]
        ctx = self.context()
        if rank is None:
            strategy = make_strategy("greedy", start="neighbour_kv")
            curves = {
                kind: error_curves(strategy, ctx, kind, progress=self.progress)
                for kind in ("k", "v")
            }
        else:
            strategy, source = make_strategy("coarsen_source"), self.source_grouping.layers
            measured = {
                kind: error_curves(
                    strategy,
                    ctx,
                    kind,
                    score=lambda layer, p, kind=kind: rank.layer_score(
                        layer, with_partition(source[layer], kind, p)
                    ),
                    progress=self.progress,
                )
                for kind in (("k", "v") if apart else ("kv",))
            }
            curves = {kind: measured[kind if apart else "kv"] for kind in ("k", "v")}
        self._curves[key] = curves
        return curves

    def kv_bytes(self, grouping: Grouping) -> int:
        return grouping.kv_bytes_per_token(self.adapter.head_dim, 2)

    # -- stage 1 -----------------------------------------------------------------------------

    def stage1(self) -> optuna.Study:
        search = self.config.search
        directions = ["minimize", "minimize"] if search.objective == "pareto" else ["minimize"]
        sampler = optuna.samplers.TPESampler(seed=self.config.seed)
        study = optuna.create_study(
            study_name=self.config.name,
            storage=self.storage,
            load_if_exists=True,
            directions=directions,
            sampler=sampler,
        )
        if not study.user_attrs.get("baselines_enqueued"):
            for average in search.budgets:
                for name in self.config.promote.baselines:
                    params = {"budget": average, "strategy": name, "allocation": False}
                    study.enqueue_trial(params, skip_if_exists=True)
            study.set_user_attr("baselines_enqueued", True)
            study.set_user_attr("config", _config_summary(self.config))
        recover_dead_trials(study)
        done = self._live_before(study, None)
        bar = tqdm(
            total=search.trials,
            initial=min(done, search.trials),
            desc="stage 1 (proxy)",
            disable=not self.progress,
        )
        objective = self._objective1(study, bar)
        while done < search.trials:
            # Repeats of a deterministic configuration are pruned and do not count, so rounds
            # continue until `trials` trials completed, or a round completed none (exhausted).
            study.optimize(objective, n_trials=search.trials - done + 8, catch=())
            # Other workers' running trials count toward the cap but may still end as pruned
            # repeats: wait for them before deciding that the cap is reached.
            self._wait_for_running(study)
            before, done = done, self._live_before(study, None)
            if done == before:
                break
        bar.close()
        return study

    def load_stage1(self) -> optuna.Study:
        try:
            return optuna.load_study(study_name=self.config.name, storage=self.storage)
        except KeyError:
            raise ValueError(
                f"study {self.config.name!r} has no stage 1 in {self.config.storage}; run stage 1 first"
            ) from None

    @staticmethod
    def _wait_for_running(study: optuna.Study, limit: float = 600.0, poll: float = 0.5) -> None:
        """Wait (at most `limit` seconds) until no trial of the study is running; this worker's
        own have finished, so these are other workers'. A crashed worker's trial that stays
        running is given up on after `limit` (recover_dead_trials fails it on the next start)."""
        deadline = time.monotonic() + limit
        while study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if time.monotonic() > deadline:
                log.warning("stage 1: trials of other workers still running after %.0f s", limit)
                return
            time.sleep(poll)

    @staticmethod
    def _live_before(study: optuna.Study, number: int | None) -> int:
        states = (TrialState.COMPLETE, TrialState.RUNNING)
        trials = study.get_trials(deepcopy=False, states=states)
        return sum(1 for t in trials if number is None or t.number < number)

    def _objective1(self, study: optuna.Study, bar):
        search = self.config.search
        strategies = sorted(search.strategies)
        budgets = list(search.budgets)

        def objective(trial: optuna.Trial):
            if self._live_before(study, trial.number) >= search.trials:
                study.stop()
                raise optuna.TrialPruned("trial cap reached")
            trial.set_user_attr("worker", WORKER)
            average = trial.suggest_categorical("budget", budgets)
            name = trial.suggest_categorical("strategy", strategies)
            allocation = trial.suggest_categorical("allocation", list(search.allocation))
            params = {
                space.name: space.suggest(trial, name) for space in search.strategies.get(name, ())
            }
            strategy = make_strategy(name, seed=self.config.seed + trial.number, **params)
            if not strategy.uses_seed():  # its grouping is known once it has run: never rerun
                signature = json.dumps([average, name, allocation, params], sort_keys=True)
                trial.set_user_attr("signature", signature)
                earlier = _earlier_with(study, "signature", signature, trial.number)
                if earlier is not None:
                    trial.set_user_attr("copy_of", earlier)
                    raise optuna.TrialPruned("repeats a deterministic configuration")
            start = time.perf_counter()
            grouping = strategy.propose(self.context(), self.budget(average, allocation))
            key = grouping_key(grouping)
            trial.set_user_attr("key", key)  # visible to concurrent workers before we score
            previous = _first_scored(study, key, trial.number)
            if previous is not None:  # a known grouping: pruned, not counted, TPE moves on
                trial.set_user_attr("duplicate_of", previous.number)
                raise optuna.TrialPruned("repeats a grouping already scored")
            t0 = time.perf_counter()
            scores = {"proxy": self.proxy.score(grouping)}
            if self.rank_proxy is not None:
                scores["rank"] = self.rank_proxy.score(grouping)
            proxy_seconds = time.perf_counter() - t0
            value = _ranking_value(scores)
            kv = self.kv_bytes(grouping)
            for attr, val in {
                **scores,
                "key": key,
                "grouping": grouping.to_json(),
                "kv_bytes": kv,
                "kv_heads": grouping.kv_heads(),
                "strategy_seconds": time.perf_counter() - start - proxy_seconds,
                "proxy_seconds": proxy_seconds,
            }.items():
                trial.set_user_attr(attr, val)
            _fault("stage1", trial.number)
            bar.update(1)
            if search.objective == "pareto":
                return value, kv
            baselines = self.config.promote.baselines
            if baselines and name == baselines[0] and not allocation:
                return 1.0
            return value / self._baseline_proxy(study, average)

        return objective

    def _baseline_proxy(self, study: optuna.Study, average: float) -> float:
        """The first baseline's proxy at this budget, so that constrained objectives are relative
        to it and comparable across budgets (raw values would lead TPE to the largest budget)."""
        baseline = self.config.promote.baselines[0] if self.config.promote.baselines else None
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            params = trial.params
            same = params.get("budget") == average and params.get("strategy") == baseline
            value = _ranking_value(trial.user_attrs) if "proxy" in trial.user_attrs else 0
            if same and not params.get("allocation") and value > 0:
                return value
        return 1.0

    # -- stage 2 -----------------------------------------------------------------------------

    def candidates(self, stage1: optuna.Study) -> list[dict]:
        """Work items: top-k per budget by proxy, the baselines, the source model."""
        trials = [
            t
            for t in stage1.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if "key" in t.user_attrs
        ]
        items: dict[str, dict] = {}
        source_key = grouping_key(self.source_grouping)
        items[source_key] = {
            "key": source_key,
            "kind": "source",
            "budget": None,
            "strategy": "source",
        }
        for average in self.config.search.budgets:
            at_budget = sorted(
                (t for t in trials if t.params.get("budget") == average),
                key=lambda t: _ranking_value(t.user_attrs),
            )
            baselines = [
                t
                for t in at_budget
                if t.params.get("strategy") in self.config.promote.baselines
                and not t.params.get("allocation")
            ]
            for trial in baselines:  # first, so a search that finds a baseline's grouping
                items.setdefault(trial.user_attrs["key"], _item(trial, "baseline"))
            picked = 0
            for trial in at_budget:
                key = trial.user_attrs["key"]
                if picked >= self.config.promote.top_k:
                    break
                if key not in items:  # a baseline's grouping stays a baseline (never pruned)
                    items[key] = _item(trial, "searched")
                    picked += 1
        return list(items.values())

    def stage2(self, stage1: optuna.Study) -> optuna.Study:
        promote = self.config.promote
        study = optuna.create_study(
            study_name=self.config.name + STAGE2_SUFFIX,
            storage=self.storage,
            load_if_exists=True,
            direction="minimize",  # the selection objective on validation after recovery
            pruner=make_pruner(promote.pruner, promote.reduction_factor),
        )
        selection = self.config.selection.describe()
        recorded = study.user_attrs.get("selection", "ppl" if study.get_trials() else selection)
        if recorded != selection:
            raise ValueError(
                f"stage 2 of study {self.config.name!r} selected by {recorded!r}, the config now "
                f"by {selection!r}: give the study a new name (or restore [selection])"
            )
        study.set_user_attr("selection", selection)
        self._check_recovery(study)
        if not study.user_attrs.get("enqueued"):
            groupings = {
                t.user_attrs["key"]: t.user_attrs["grouping"]
                for t in stage1.get_trials(deepcopy=False)
                if "grouping" in t.user_attrs  # a running trial may have published only its key
            }
            queued = {t.user_attrs.get("item_key") for t in study.get_trials(deepcopy=False)}
            for item in self.candidates(stage1):
                if item["key"] in queued:
                    continue
                item.setdefault(
                    "grouping", groupings.get(item["key"], self.source_grouping.to_json())
                )
                study.enqueue_trial(
                    {},
                    user_attrs={
                        "item": json.dumps(item),
                        "item_key": item["key"],
                        "budget": item["budget"],
                    },
                )
            study.set_user_attr("enqueued", True)
        recover_dead_trials(study)
        waiting = lambda: study.get_trials(deepcopy=False, states=(TrialState.WAITING,))  # noqa: E731
        items = {
            t.user_attrs["item_key"]
            for t in study.get_trials(deepcopy=False)
            if "item_key" in t.user_attrs
        }
        finished = (TrialState.COMPLETE, TrialState.PRUNED)
        done = {
            t.user_attrs.get("item_key") for t in study.get_trials(deepcopy=False, states=finished)
        }
        bar = tqdm(
            total=len(items), initial=len(done), desc="stage 2 (recover)", disable=not self.progress
        )
        while waiting():
            trial = study.ask()
            if "item" not in trial.user_attrs:  # another worker took the last item meanwhile
                study.tell(trial, state=TrialState.PRUNED)
                break
            trial.set_user_attr("worker", WORKER)
            item = json.loads(trial.user_attrs["item"])
            if _claimed_earlier(study, item["key"], trial.number):  # enqueued twice by a race
                trial.set_user_attr("duplicate_of", item["key"])
                study.tell(trial, state=TrialState.PRUNED)
                continue
            try:
                results = self.evaluate_item(item, trial)
            except optuna.TrialPruned:
                study.tell(trial, state=TrialState.PRUNED)
            else:
                for attr, value in results.items():
                    trial.set_user_attr(attr, value)
                study.tell(trial, results["valid_ppl"])
            bar.update(1)
        bar.close()
        return study

    def _check_recovery(self, study: optuna.Study) -> None:
        """Refuse to resume a stage 2 whose candidates were recovered by another chain: its
        finished candidates would be ranked against new ones built differently. A stage 2
        stored before the chain was recorded is resumed as it is."""
        promote = self.config.promote
        chain = {method: promote.recovery_config.get(method, {}) for method in promote.recovery}
        current = json.dumps(
            {"recovery": list(promote.recovery), "recovery_config": chain}, sort_keys=True
        )
        recorded = study.user_attrs.get("recovery")
        if recorded is None and study.get_trials(deepcopy=False):
            return
        if recorded is not None and recorded != current:
            before, now = (
                _flat(json.loads(recorded), "promote"),
                _flat(json.loads(current), "promote"),
            )
            changes = "; ".join(
                f"{key}: {before.get(key, '(unset)')} -> {now.get(key, '(unset)')}"
                for key in sorted(set(before) | set(now))
                if before.get(key) != now.get(key)
            )
            raise ValueError(
                f"stage 2 of study {self.config.name!r} recovered its candidates by another "
                f"chain than [promote] now gives ({changes}): give the study a new name (or "
                "restore the recovery settings)"
            )
        study.set_user_attr("recovery", current)

    # -- candidates: conversion, recovery in rungs, evaluation -----------------------------------

    def recovery_chain(self, recovery_seed: int | None = None) -> list[tuple[str, object]]:
        """(method, config) in order; `recovery_seed` replaces every method's own seed."""
        chain = []
        for method in self.config.promote.recovery:
            config = recovery_config(method, self.config.promote.recovery_config.get(method))
            if recovery_seed is not None:
                config = dataclasses.replace(config, seed=recovery_seed)
            chain.append((method, config))
        return chain

    def candidate_digest(self, grouping: Grouping, recovery_seed: int | None = None) -> str:
        """A digest of everything `build_candidate` depends on (model, calibration, grouping,
        merge, recovery chain and seed): results cached under it are never reused for a model
        built differently."""
        recipe = {
            "model": self.config.model,
            "calibration": repr(self.config.calibration),
            "grouping": grouping.to_json(),
            "merge": self.config.search.merge,
            "chain": [
                (method, repr(config)) for method, config in self.recovery_chain(recovery_seed)
            ],
        }
        return hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]

    def build_candidate(
        self,
        grouping: Grouping,
        *,
        recovery_seed: int | None = None,
        progress: bool = True,
        on_rung=None,
    ) -> torch.nn.Module:
        """A copy of the source converted to `grouping` with the study's merge and statistics,
        then recovered by the study's chain. `on_rung(model, after)` is called on the merged
        model ("merge") and after each method; it may raise optuna.TrialPruned to stop. A chain
        with a step that caches nothing itself is kept whole (search.candidate_cache): a rebuild
        without `on_rung` loads it instead of training again."""
        merge = self.config.search.merge
        chain = self.recovery_chain(recovery_seed)
        model = gqa.converted_copy(self.source, grouping, merge, self.stats, own=trained(chain))
        # Kept on disk when a step of the chain keeps nothing itself (distillation does not; the
        # layer-wise fits have their own cache). Stage 2 (on_rung) always runs its rungs.
        cache = None if all(getattr(c, "cache", False) for _, c in chain) else CandidateCache()
        # The statistics' fingerprint follows the source's weights, which the digest names only.
        digest = f"{self.candidate_digest(grouping, recovery_seed)}-{stats_fingerprint(self.stats)}"
        if cache and on_rung is None and cache.load(digest, model, self.source):
            return model
        if on_rung:
            on_rung(model, "merge")
        for method, config in chain:
            recover(
                method,
                model,
                self.source,
                self.loaded.tokenizer,
                self.stats,
                config,
                progress=progress,
                merge=merge,
            )
            if on_rung:
                on_rung(model, method)
        if cache:
            cache.store(digest, model, self.source)
        return model

    def validation_ppl(self, model: torch.nn.Module) -> float:
        """The selection objective on validation data (objectives.selection; by default the
        perplexity of the validation windows): what stage 2 ranks and prunes by."""
        if self._valid_windows is None:
            promote = self.config.promote
            spec = TextSpec(VALID_SPLIT, promote.seq_len, promote.valid_windows)
            self._valid_windows = token_windows(self.loaded.tokenizer, spec)
        return self.config.selection.value(
            model, self.loaded.tokenizer, "valid", self._valid_windows
        )

    def evaluate_item(self, item: dict, trial: optuna.Trial | None = None) -> dict:
        """Recover one candidate in rungs, reporting validation perplexity after each (searched
        candidates may be pruned there), then evaluate the survivor on the test data."""
        promote = self.config.promote
        start = time.perf_counter()
        grouping = Grouping.from_json(item["grouping"])
        rungs: list[dict] = []

        def on_rung(model, after: str) -> None:
            ppl = self.validation_ppl(model)
            rungs.append({"after": after, "valid_ppl": ppl, "seconds": time.perf_counter() - start})
            if trial is None:
                return
            trial.set_user_attr("rungs", json.dumps(rungs))
            trial.report(ppl, len(rungs) - 1)
            # Baselines and the source report (so candidates compete with them) but always finish.
            if len(rungs) > 1 and trial.should_prune() and item["kind"] == "searched":
                trial.set_user_attr("pruned_after", after)
                raise optuna.TrialPruned(f"pruned after {after}: validation ppl {ppl:.2f}")

        if item["kind"] == "source":
            model = self.source
            on_rung(model, "source")
        else:
            model = self.build_candidate(grouping, progress=self.progress, on_rung=on_rung)
        _fault("stage2", trial.number if trial is not None else -1)
        results = evaluate(
            model,
            self.loaded.tokenizer,
            list(promote.tasks),
            limit=promote.limit,
            ppl_spec=TextSpec(TEST_SPLIT, promote.seq_len, promote.ppl_windows),
            batch_size=promote.batch_size,
            progress=self.progress,
            subset="test",
            long_config=self.config.long_context,
        )
        out = {
            "results": json.dumps(results),
            "rungs": json.dumps(rungs),
            "kv_bytes": self.kv_bytes(grouping),
            "kv_heads": grouping.kv_heads(),
            "valid_ppl": rungs[-1]["valid_ppl"],
        }
        if item["kind"] != "source":
            out["valid_ppl_merged"] = rungs[0]["valid_ppl"]
            for rung in rungs[1:]:
                out[f"valid_ppl_after_{rung['after']}"] = rung["valid_ppl"]
        if "ppl" in results:
            out["ppl"] = results["ppl"]["perplexity"]
        accs = [v["acc"] for v in results.values() if "acc" in v]
        for task, value in results.items():
            if "acc" in value:
                out[f"acc_{task}"] = value["acc"]
            elif task in SCORED_TASKS:  # long_ppl: late-bucket perplexity; retrieval: accuracy
                out[task] = value["score"]
        if accs:
            out["mean_acc"] = sum(accs) / len(accs)
        out["eval_seconds"] = time.perf_counter() - start
        return out

    # -- everything ----------------------------------------------------------------------------

    @contextmanager
    def timed(self):
        """Add the wall time of the work inside to the study's `wall_seconds` user attribute (in
        the storage), also when it is interrupted: summed over every run and worker, it is what
        the study cost, however often it was resumed."""
        start = time.perf_counter()
        try:
            yield
        finally:
            try:
                stage1 = self.load_stage1()
            except ValueError:  # failed before stage 1 existed: nothing to record it on
                stage1 = None
            if stage1 is not None:
                total = stage1.user_attrs.get("wall_seconds", 0.0) + time.perf_counter() - start
                stage1.set_user_attr("wall_seconds", total)  # unrounded: short runs still add up

    def wall_seconds(self) -> float:
        return float(self.load_stage1().user_attrs.get("wall_seconds", 0.0))

    def run(self) -> StudyResult:
        start = time.perf_counter()
        with self.timed():
            stage1 = self.stage1()
            stage2 = self.stage2(stage1)
        return StudyResult(
            stage1_complete=len(stage1.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))),
            stage2_complete=len(stage2.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))),
            seconds=time.perf_counter() - start,
        )


def _flat(value, prefix: str = "") -> dict[str, object]:
    """{"a.b": leaf} for a nested dict (lists are leaves)."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, object] = {}
    for key, inner in value.items():
        out.update(_flat(inner, f"{prefix}.{key}" if prefix else key))
    return out


def _ranking_value(attrs: dict) -> float:
    """What ranks stage-1 trials: the rank proxy's score when there is one, else the proxy's."""
    return attrs["rank"] if "rank" in attrs else attrs["proxy"]


def _item(trial, kind: str) -> dict:
    return {
        "key": trial.user_attrs["key"],
        "kind": kind,
        "budget": trial.params.get("budget"),
        "strategy": trial.params.get("strategy"),
        "allocation": trial.params.get("allocation"),
        "proxy": trial.user_attrs["proxy"],
        "rank": trial.user_attrs.get("rank"),
        "stage1_trial": trial.number,
    }


def _first_scored(study: optuna.Study, key: str, number: int) -> optuna.trial.FrozenTrial | None:
    """The earliest other trial that holds this grouping, once it is scored. A concurrent worker's
    trial still running on the same grouping is waited for, so no grouping is scored twice; if it
    dies (or has not finished after `SCORE_WAIT_S`), this trial scores the grouping itself."""
    live = (TrialState.COMPLETE, TrialState.RUNNING)
    deadline = time.monotonic() + SCORE_WAIT_S
    while time.monotonic() < deadline:
        trials = study.get_trials(deepcopy=False, states=live)
        holders = [
            t
            for t in trials
            if t.user_attrs.get("key") == key
            and t.number != number
            and "duplicate_of" not in t.user_attrs
        ]
        complete = [t for t in holders if t.state == TrialState.COMPLETE]
        if complete:
            return min(complete, key=lambda t: t.number)
        # An earlier trial still choosing its grouping may publish this key after we looked, and
        # it would win: wait until it has published (the "choosing" flag of Lamport's bakery).
        if not any(t.number < number for t in holders) and not any(
            t.number < number and _choosing(t) for t in trials
        ):
            return None
        time.sleep(0.05)
    return None


def _choosing(trial: optuna.trial.FrozenTrial) -> bool:
    """A running stage-1 trial that has not published its grouping key yet (and whose worker,
    when on this host, is alive)."""
    if trial.state != TrialState.RUNNING or "key" in trial.user_attrs:
        return False
    name, _, pid = trial.user_attrs.get("worker", "").rpartition(":")
    return not (name == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)))


def _earlier_with(study: optuna.Study, attr: str, value: str, number: int) -> int | None:
    """The number of the earliest live (complete or running) trial before `number` whose user
    attribute `attr` equals `value`, or None."""
    live = (TrialState.COMPLETE, TrialState.RUNNING)
    trials = study.get_trials(deepcopy=False, states=live)
    earlier = [t.number for t in trials if t.user_attrs.get(attr) == value and t.number < number]
    return min(earlier, default=None)


def _claimed_earlier(study: optuna.Study, key: str, number: int) -> bool:
    """Whether an earlier trial took this stage-2 item (running, complete, or pruned by the
    pruner; copies pruned as duplicates do not count)."""
    states = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.PRUNED)
    return any(
        t.user_attrs.get("item_key") == key
        and t.number < number
        and "duplicate_of" not in t.user_attrs
        for t in study.get_trials(deepcopy=False, states=states)
    )


def _config_summary(config: StudyConfig) -> str:
    data = asdict(config)
    data["path"] = str(config.path) if config.path else None
    return json.dumps(data, default=str)


def trained(chain: list[tuple[str, object]]) -> tuple[str, ...] | str:
    """The q/o projections a recovery chain trains ("all": it trains beyond attention), which a
    candidate must own rather than share with the source (see gqa.converted_copy)."""
    names: set[str] = set()
    for _, config in chain:
        train = getattr(config, "train", None) or getattr(config, "trainable", None) or ()
        if train == "all":
            return "all"
        names |= set(train)
    return tuple(sorted(names & {"q", "o"}))
