"""The byte front: quality per KV-cache byte, head grouping and cache precision searched together.

After stage 2, every point is a (model, precision plan) pair: the source, or a stage-2 winner
(the best complete candidate on validation at each head budget, rebuilt with the study's merge
and recovery), with its cache at 16 bits, quantized uniformly, or with per-layer bits allocated
exactly under a byte budget from the KV-quantization proxy (search.byte_allocation). Per byte budget
(a fraction of the source's 16-bit cache in bytes per token, counted at the study's context:
search.byte_allocation.ByteCounting, a full-precision window's tokens included) the families
compete:

    quantization     the source, uniform K/V bits and group size (what a careful user would pick)
    mixed_precision  the source, per-layer K/V bits allocated under the budget (G fixed)
    grouping         a converted model (or the source) at 16 bits: head grouping alone
    latent           with `latent_ranks`: the source with per-layer K/V latent ranks allocated
                     under the budget (gqa.latent, objectives.latent_error), 16-bit cache
    joint            every point above, every converted model with allocated bits, and (with
                     `layer_mix`) models that take each layer from the source or a stage-2
                     winner, grouping and bits allocated together (search.byte_allocation.allocate_joint);
                     with `latent_ranks`, a layer of the source may also be made latent there,
                     each latent at 16 bits or quantized (Palu's low rank with bits);
                     with `protect = k`, each winner's k layers of highest long-range cost
                     (objectives.long_range) stay the source's in those mixes; with
                     `layer_costs = "long_range"` the allocations weigh each winner's layers by
                     their long-range cost and the bits by a measured nats-per-unit rate
Latent layers get no recovery here: their factors are the whitened SVD's (0 training tokens).

Each family's choice at a budget is its point of least *validation* perplexity that fits (or of
the study's selection objective, objectives.selection: long-context perplexity, retrieval, a mix);
only the chosen points are measured on test data. So the joint choice can never be worse on validation
than a single-axis one; test perplexity says whether that holds on unseen text. With `screen = k`
only the k fitting points of least proxy error (each point's grouping error plus its cache's
quantization error, the units the allocations minimise) per budget and family are measured on
validation: the proxy screens, validation chooses.

The points, the families (registered classes) and the choices made from measured values live in
search.front_points; this module builds the points, measures them and keeps the record.

Points are recorded as trials of the Optuna study `<name>:kvfront` in the study's storage (the
single record of a run): a stopped front resumes, and nothing measured is measured again. The
16-bit points of the source and of the stage-2 winners take stage 2's perplexities when the
front reads the same windows (`valid_windows` = promote's, `test_windows` = `ppl_windows`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math

import optuna
import pandas as pd
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial
from tqdm.auto import tqdm

import gqa
from gqa.grouping import Grouping
from gqa.latent_model import apply_latent
from gqa.precision import PrecisionPlan
from objectives.data import TEST_SPLIT, VALID_SPLIT, TextSpec, token_windows
from objectives.kv_quant_error import QuantErrorTable, grouping_errors, kv_quant_errors
from objectives.latent_error import LatentErrorTable, latent_errors
from objectives.long_context import long_windows
from objectives.long_range import (
    LongRangeCosts,
    late_nll,
    long_range_costs,
    nats_per_unit,
    precision_rises,
)
from objectives.recovery.layerwise import stats_fingerprint
from search.budget import Budget
from search.byte_allocation import (
    ByteBudget,
    ByteCounting,
    InfeasibleBudget,
    allocate_joint,
    allocate_latent,
    allocate_precision,
    uniform_settings,
)
from search.front_points import (
    LATENT_PREFIX,
    MIX_PREFIX,
    SOURCE,
    FrontModel,
    Point,
    choose,
    screened,
)
from search.results import load_study, stage2_frame
from search.study import Study

log = logging.getLogger(__name__)
FRONT_SUFFIX = ":kvfront"


class KVFront:
    """The byte front of a finished study (stage 2 complete); `run()` does what is left."""

    def __init__(self, study: Study, progress: bool = True):
        self.study = study
        self.config = study.config.precision
        self.progress = progress
        if not self.config.budgets:
            raise ValueError("precision.budgets is empty: the study config asks for no byte front")
        adapter = study.adapter
        self.layers, self.head_dim = adapter.num_layers, adapter.head_dim
        self.source_bytes = study.source_grouping.kv_bytes_per_token(self.head_dim)
        self.context = study.config.byte_context  # bytes counted at this many tokens
        self.storage_study = optuna.create_study(
            study_name=study.config.name + FRONT_SUFFIX,
            storage=study.storage,
            load_if_exists=True,
            direction="minimize",
        )
        self._modules: dict[tuple[str, int | None], object] = {}  # (model name, recovery seed)
        self._quant_errors: dict[tuple[str, int, int], object] = {}  # (model, group, window)
        self._layer_errors: dict[str, tuple[float, ...]] = {}
        self._windows: dict[str, object] = {}
        self._latent_tables: dict[int, LatentErrorTable] = {}  # per window
        self._nats_per_unit: float | None = None
        self._stats_fingerprint: str | None = None
        self.long_units = self.config.layer_costs == "long_range"

    # -- models and measurements ---------------------------------------------------------------

    def base_models(self) -> dict[str, FrontModel]:
        """The source and the best complete stage-2 candidate (on validation) per head budget,
        each with the stage-2 row that measured it."""
        stage2 = stage2_frame(self.study.config.name, self.study.storage)
        config = self.study.config
        if stage2.empty or "state" not in stage2:
            raise ValueError(
                f"study {config.name!r} has no stage-2 results in {config.storage}: run "
                f"`headgroup study --config {config.path or '<its config>'}` first"
            )
        done = stage2[(stage2["state"] == "complete") & stage2["budget"].notna()]
        if done.empty:
            raise ValueError(
                f"study {config.name!r} has no complete stage-2 candidate: run "
                f"`headgroup study --config {config.path or '<its config>'}` to finish it"
            )
        source = stage2[stage2["kind"] == "source"]
        row = source.iloc[0].to_dict() if len(source) else None
        out = {SOURCE: FrontModel(SOURCE, self.study.source_grouping, stage2=row)}
        for budget, rows in done.groupby("budget"):
            best = rows.sort_values("valid_ppl").iloc[0]
            name = f"{budget:g}kv:{best['strategy']}"
            grouping = Grouping.from_json(best["grouping"])
            out[name] = FrontModel(name, grouping, stage2=best.to_dict())
        return out

    def _from_stage2(self, point: Point, metric: str) -> float | None:
        """What stage 2 measured for a 16-bit point of the source or of a stage-2 winner (the
        same model, built by the same recovery) when it read the front's windows; else None."""
        row = point.model.stage2
        if point.plan is not None or row is None:
            return None
        promote = self.study.config.promote
        if metric == "valid_ppl":  # stage 2 selected by the same objective (the study's)
            same, column = promote.valid_windows == self.config.valid_windows, "valid_ppl"
        else:  # stage 2's test perplexity: the front's test metric only for the short objective
            same = promote.ppl_windows == self.config.test_windows
            same, column = same and self.study.config.selection.is_short_ppl, "ppl"
        value = row.get(column) if same else None
        return None if value is None or pd.isna(value) else float(value)

    def module(self, model: FrontModel, recovery_seed: int | None = None, control: bool = False):
        """The 16-bit network of a point's model (kept: a candidate shares all but its attention
        with the source); `recovery_seed` replaces the study's recovery seeds (the source has
        none). `control`: a point on the source rebuilt on the control, the source recovered by
        the study's chain like every candidate (the same recipe and text), so that a recovered
        point is compared with a source that saw the same training."""
        if control and not model.is_source:
            raise ValueError(f"the control is the source recovered; {model.name} is not on it")
        seed = None if model.is_source and not control else recovery_seed
        key = (f"control:{model.name}" if control else model.name, seed)
        if key not in self._modules:
            if control:
                module = self.study.build_candidate(
                    self.study.source_grouping, recovery_seed=seed, progress=self.progress
                )
            elif model.is_source or model.grouping == self.study.source_grouping:
                module = gqa.converted_copy(self.study.source, model.grouping)  # exact, shared
            else:
                module = self.study.build_candidate(
                    model.grouping, recovery_seed=seed, progress=self.progress
                )
            if model.latent is not None:
                grams = [layer.gram for layer in self.study.stats.layers]
                module = apply_latent(module, model.latent, grams)
            self._modules[key] = module
        return self._modules[key]

    def latent_table(self, window: int | None = None) -> LatentErrorTable:
        """The source's latent error table at the config's `latent_ranks`, each latent also
        quantized at the config's bits (the allocations' group size, and `window`: by default the
        first of the config's), kept."""
        window = self.config.windows[0] if window is None else window
        if window not in self._latent_tables:
            source = FrontModel(SOURCE, self.study.source_grouping)
            group_size = self.config.group_sizes[0]
            settings = f"r{list(self.config.latent_ranks)}b{list(self.config.bits)}"
            self._latent_tables[window] = self._kept(
                self._table_key("latent_table", source, f"{settings}g{group_size}w{window}"),
                LatentErrorTable,
                lambda: latent_errors(
                    self.module(source),
                    self.study.stats,
                    self.config.latent_ranks,
                    self.progress,
                    bits=self.config.bits,
                    group_size=group_size,
                    window=window,
                ),
            )
            if self.long_units:
                table = self._latent_tables[window].scaled(self.nats_per_unit())
                self._latent_tables[window] = table
        return self._latent_tables[window]

    def _quant_table(
        self, model: FrontModel, group_size: int | None = None, window: int | None = None
    ):
        """A model's quantization error table at a group size and a full-precision window (by
        default the allocations': the config's first of each), in the allocations' units (see
        `layer_costs`)."""
        table = self._proxy_table(model, group_size, window)
        return table.scaled(self.nats_per_unit()) if self.long_units else table

    def _proxy_table(
        self, model: FrontModel, group_size: int | None = None, window: int | None = None
    ):
        """`_quant_table` in the proxy's own units (objectives.kv_quant_error), kept."""
        group_size = self.config.group_sizes[0] if group_size is None else group_size
        window = self.config.windows[0] if window is None else window
        key = (model.name, group_size, window)
        if key not in self._quant_errors:
            settings = f"b{list(self.config.bits)}g{group_size}w{window}"
            self._quant_errors[key] = self._kept(
                self._table_key("quant_table", model, settings),
                QuantErrorTable,
                lambda: kv_quant_errors(
                    self.module(model),
                    self.study.stats,
                    bits=self.config.bits,
                    group_size=group_size,
                    window=window,
                ),
            )
        return self._quant_errors[key]

    def _table_key(self, table: str, model: FrontModel, settings: str) -> str:
        """Where a model's error table at `settings` is kept in the front's storage: named by
        the model, the recipe that builds it (Study.candidate_digest) and the calibration
        statistics that measure it (their fingerprint follows the source's weights)."""
        if self._stats_fingerprint is None:
            self._stats_fingerprint = stats_fingerprint(self.study.stats)
        digest = self.study.candidate_digest(model.grouping)
        return f"{table}:{model.name}:{digest}-{self._stats_fingerprint}:{settings}"

    def _kept(self, key: str, table_type, measure):
        """The error table kept in the front's storage under `key`, else `measure()`d and kept
        there, so that a resumed front reads the tables it already measured (the latent table
        alone takes minutes at SmolLM2's size)."""
        stored = self.storage_study.user_attrs.get(key)
        if stored is not None:
            return table_type.from_json(stored)
        table = measure()
        self.storage_study.set_user_attr(key, table.to_json())
        return table

    def _proxy(self, model: FrontModel, plan: PrecisionPlan | None) -> float:
        """The decomposed error estimate of a whole-model point: its grouping's layer errors
        against the source plus its cache's quantization errors (the allocation's units)."""
        error = sum(self.layer_errors(model))
        if plan is not None:
            error += self._quant_table(model, plan.group_size, plan.window).plan_error(plan)
        return error

    def layer_errors(self, model: FrontModel) -> tuple[float, ...]:
        """Per layer, what a model's layer costs against the source's at 16 bits, in the
        allocation's units (objectives.kv_quant_error.grouping_errors, or with `layer_costs =
        "long_range"` its long-range costs, a cost below 0 read as 0, scaled so that they sum to
        the whole model's: LongRangeCosts.compounding; 0 for the source)."""
        if model.name not in self._layer_errors:
            if model.is_source:
                self._layer_errors[model.name] = (0.0,) * self.layers
            elif self.long_units:
                costs = self.long_range(model)
                factor = costs.compounding()
                self._layer_errors[model.name] = tuple(factor * max(c, 0.0) for c in costs.costs)
            else:
                self._layer_errors[model.name] = self.short_layer_errors(model)
        return self._layer_errors[model.name]

    def short_layer_errors(self, model: FrontModel) -> tuple[float, ...]:
        """Per layer, the short-window grouping error of a model's layer against the source's
        (objectives.kv_quant_error.grouping_errors, the proxy's units)."""
        return grouping_errors(self.module(model), self.study.source, self.study.stats)

    def _mix_errors(self, model: FrontModel) -> tuple[float, ...]:
        """A model's per-layer grouping errors for the layer mixes: infinite (not allowed) at the
        `protect` layers of highest long-range cost of a stage-2 winner."""
        errors = self.layer_errors(model)
        if not self.config.protect or model.is_source:
            return errors
        protected = set(self.long_range(model).most_costly(self.config.protect))
        return tuple(math.inf if i in protected else e for i, e in enumerate(errors))

    def long_range(self, model: FrontModel) -> LongRangeCosts:
        """The long-range cost of each of a model's layers (objectives.long_range, on validation
        long documents), kept in the front's storage: measured once per model and settings."""
        long_config = self.study.config.long_context
        key = f"long_range:{model.name}:{long_config.seq_len}x{long_config.ppl_windows}"
        key += f":{self.study.candidate_digest(model.grouping)}"
        stored = self.storage_study.user_attrs.get(key)
        if stored is None:
            source = FrontModel(SOURCE, self.study.source_grouping)
            costs = long_range_costs(
                self.module(source),
                self.module(model),
                self.study.loaded.tokenizer,
                long_config,
                progress=self.progress,
            )
            stored = {"costs": costs.costs, "base_nll": costs.base_nll, "whole": costs.whole}
            self.storage_study.set_user_attr(key, stored)
        elif stored.get("whole") is None:  # stored before the whole model's cost was measured
            windows = long_windows(
                self.study.loaded.tokenizer, "valid", long_config.seq_len, long_config.ppl_windows
            )
            whole = late_nll(self.module(model), windows, long_config) - stored["base_nll"]
            stored = {**stored, "whole": whole}
            self.storage_study.set_user_attr(key, stored)
        return LongRangeCosts(stored["costs"], stored["base_nll"], stored["whole"])

    def nats_per_unit(self) -> float:
        """Nats of late-bucket NLL per unit of the quantization proxy (`layer_costs =
        "long_range"`): the source's cache under each uniform setting at the allocations' group
        size and window, measured on the long-range costs' validation documents
        (objectives.long_range.precision_rises) and fitted on the settings' proxy errors
        (objectives.long_range.nats_per_unit); the rises are kept in the front's storage."""
        if self._nats_per_unit is None:
            long_config = self.study.config.long_context
            group, window = self.config.group_sizes[0], self.config.windows[0]
            settings = uniform_settings(self.config.bits, [group])
            plans = [PrecisionPlan.uniform(self.layers, k, v, g, window) for k, v, g in settings]
            key = f"long_range_scale:{long_config.seq_len}x{long_config.ppl_windows}"
            key += ":" + ",".join(f"K{k}V{v}g{g}w{window}" for k, v, g in settings)
            source = FrontModel(SOURCE, self.study.source_grouping)
            rises = self.storage_study.user_attrs.get(key)
            if rises is None:
                rises = precision_rises(
                    self.module(source),
                    self.study.loaded.tokenizer,
                    plans,
                    long_config,
                    progress=self.progress,
                )
                self.storage_study.set_user_attr(key, rises)
            table = self._proxy_table(source, group, window)
            self._nats_per_unit = nats_per_unit([table.plan_error(p) for p in plans], rises)
        return self._nats_per_unit

    def text_windows(self, split: str, count: int):
        """`count` windows of the study's sequence length from a split (kept)."""
        if split not in self._windows:
            spec = TextSpec(split, self.study.config.promote.seq_len, count)
            self._windows[split] = token_windows(self.study.loaded.tokenizer, spec)
        return self._windows[split]

    def windows(self) -> dict[str, str]:
        """The text each metric is measured on ("<windows>x<seq_len>", then the selection
        objective unless it is the short perplexity): a measurement on other windows or by
        another objective (a changed config) is not reused."""
        seq_len = self.study.config.promote.seq_len
        selection = self.study.config.selection
        suffix = "" if selection.is_short_ppl else f" {selection.describe()}"
        return {
            "valid_ppl": f"{self.config.valid_windows}x{seq_len}{suffix}",
            "test_ppl": f"{self.config.test_windows}x{seq_len}{suffix}",
        }

    def _measured(self) -> dict[tuple[str, str], float]:
        """(point key, "valid_ppl" | "test_ppl") -> perplexity, as recorded in the storage on the
        windows the config asks for."""
        trials = self.storage_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        windows = self.windows()
        return {
            (t.user_attrs["key"], t.user_attrs["metric"]): t.value
            for t in trials
            if t.user_attrs.get("windows") == windows[t.user_attrs["metric"]]
        }

    def _measure(self, point: Point, split: str) -> float:
        """The selection objective (by default perplexity) of a point on validation or test
        data, from the storage when already measured."""
        metric = "valid_ppl" if split == VALID_SPLIT else "test_ppl"
        known = self._measured().get((point.key, metric))
        if known is not None:
            return known
        value = self._from_stage2(point, metric)
        if value is None:
            count = self.config.valid_windows if split == VALID_SPLIT else self.config.test_windows
            with gqa.precision_applied(self.module(point.model), point.plan) as module:
                value = self.study.config.selection.value(
                    module,
                    self.study.loaded.tokenizer,
                    "valid" if split == VALID_SPLIT else "test",
                    self.text_windows(split, count),
                )
        self.storage_study.add_trial(
            create_trial(
                params={"kv_fraction": point.kv_bytes / self.source_bytes},
                distributions={"kv_fraction": FloatDistribution(0.0, 1.0)},
                value=value,
                user_attrs={
                    "key": point.key,
                    "metric": metric,
                    "windows": self.windows()[metric],
                    "model": point.model.name,
                    "plan": json.dumps(None if point.plan is None else point.plan.to_dict()),
                    "precision": point.label(),
                    "cache": point.cache,
                    "kv_bytes": point.kv_bytes,
                    "kv_fraction": point.kv_bytes / self.source_bytes,
                    "proxy": point.proxy,
                    "layers": point.model.layers,
                    "grouping": point.model.grouping.to_json() if point.model.is_mix else "",
                    "latent": json.dumps(point.model.latent.to_dict())
                    if point.model.latent
                    else "",
                },
            )
        )
        return value

    # -- the front -----------------------------------------------------------------------------

    def points(self, models: dict[str, FrontModel]) -> list[Point]:
        """Every point: uniform settings of the source, every model at 16 bits, and every model
        with bits allocated under each budget it does not fit at 16 bits."""
        out: list[Point] = []
        source = models[SOURCE]
        for window in self.config.windows:
            for k, v, g in uniform_settings(self.config.bits, self.config.group_sizes):
                plan = PrecisionPlan.uniform(self.layers, k, v, g, window)
                proxy = self._proxy(source, plan)
                out.append(Point(source, plan, self._bytes(plan, source), "uniform", proxy))
        for model in models.values():
            kv_bytes = model.grouping.kv_bytes_per_token(self.head_dim)
            out.append(Point(model, None, kv_bytes, "16-bit", self._proxy(model, None)))
        for fraction in self.config.budgets:
            budget = ByteBudget.of_source(fraction, self.source_bytes)
            for window in self.config.windows:
                out.extend(self._allocated(models, budget, window))
            if self.config.latent_ranks:
                latent = self._latent_point(models[SOURCE], budget)
                if latent is not None:
                    out.append(latent)
            if self.config.layer_mix and (len(models) > 1 or self.config.latent_ranks):
                for window in self.config.windows:
                    mixed = self._layer_mix(models, budget, window)
                    if mixed is not None and mixed.key not in {p.key for p in out}:
                        out.append(mixed)
        return out

    def _allocated(
        self, models: dict[str, FrontModel], budget: ByteBudget, window: int
    ) -> list[Point]:
        """Every model that does not fit the budget at 16 bits, with bits allocated under it
        (with a full-precision window of `window` tokens, its bytes counted)."""
        out = []
        for model in models.values():
            if model.grouping.kv_bytes_per_token(self.head_dim) <= budget.bytes_per_token:
                continue  # fits at 16 bits: quantizing it cannot help this budget's choice
            try:
                plan = allocate_precision(
                    self._quant_table(model, window=window),
                    budget.bytes_per_token,
                    self.head_dim,
                    (*self.config.bits, 16),
                    self.context,
                )
            except InfeasibleBudget:
                continue
            kv_bytes = self._bytes(plan, model)
            out.append(Point(model, plan, kv_bytes, "allocated", self._proxy(model, plan)))
        return out

    def _layer_mix(
        self, models: dict[str, FrontModel], budget: ByteBudget, window: int | None = None
    ) -> Point | None:
        """Grouping and bits allocated together over layers of the source and every winner (with
        a full-precision window of `window` tokens, by default the config's first); the model is
        named `mix:<digest>` unless every layer comes from one model."""
        window = self.config.windows[0] if window is None else window
        if models[SOURCE].grouping.kv_bytes_per_token(self.head_dim) <= budget.bytes_per_token:
            return None  # the source fits at 16 bits
        latent = self.latent_table(window) if self.config.latent_ranks else None
        try:
            allocation = allocate_joint(
                {name: self._quant_table(m, window=window) for name, m in models.items()},
                {name: self._mix_errors(m) for name, m in models.items()},
                budget.bytes_per_token,
                self.head_dim,
                (*self.config.bits, 16),
                latent=latent,
                latent_model=None if latent is None else SOURCE,
                context=self.context,
            )
        except InfeasibleBudget:
            return None
        layers = tuple(
            models[name].grouping.layers[layer] for layer, name in enumerate(allocation.models)
        )
        grouping = Grouping(self.study.source_grouping.num_heads, layers)
        mixed = None
        if allocation.latent is None:
            mixed = next((m for m in models.values() if m.grouping == grouping), None)
        if mixed is None:
            text = grouping.to_json()
            if allocation.latent is not None:
                text += json.dumps(allocation.latent.to_dict())
            digest = hashlib.sha1(text.encode()).hexdigest()[:8]
            counts = pd.Series(allocation.models).value_counts()
            given = ", ".join(f"{n} {name}" for name, n in counts.items())
            if allocation.latent is not None:
                latent_layers = sum(layer.is_latent for layer in allocation.latent.layers)
                given += f" ({latent_layers} of the source's latent)"
            mixed = FrontModel(
                MIX_PREFIX + digest, grouping, layers=given, latent=allocation.latent
            )
        plan = allocation.plan
        return Point(mixed, plan, self._bytes(plan, mixed), "allocated", allocation.error)

    def _latent_point(self, source: FrontModel, budget: ByteBudget) -> Point | None:
        """The source with latent ranks allocated under the budget (None where the ranks cannot
        meet it, or where it needs none)."""
        try:
            plan, error = allocate_latent(self.latent_table(), budget.bytes_per_token, self.context)
        except InfeasibleBudget:
            return None
        if not any(layer.is_latent for layer in plan.layers):
            return None
        digest = hashlib.sha1(json.dumps(plan.to_dict()).encode()).hexdigest()[:8]
        ranks = " ".join(f"{layer.k_rank or '-'}/{layer.v_rank or '-'}" for layer in plan.layers)
        model = FrontModel(
            LATENT_PREFIX + digest, source.grouping, layers=f"K/V ranks: {ranks}", latent=plan
        )
        return Point(model, None, self._bytes(None, model), "16-bit", error)

    def _bytes(self, plan: PrecisionPlan | None, model: FrontModel) -> float:
        """Bytes per token of a model's cache under `plan` (None: 16 bits), counted at the
        front's context (ByteCounting: the window's tokens included): a latent kind caches its
        rank, any other kind its heads, at the plan's bits."""
        counts = Budget.of(model.grouping)
        plan = plan or PrecisionPlan.uniform(self.layers, 16)
        latent = model.latent.layers if model.latent else (None,) * self.layers
        counting = ByteCounting(plan.group_size, plan.window, self.context)

        def kind(bits: int, heads: int, rank: int | None) -> float:
            if rank is None:
                return counting.per_token(bits, heads, self.head_dim)
            return counting.per_token(bits, 1, rank)

        return sum(
            kind(p.k_bits, counts.k[i], r and r.k_rank)
            + kind(p.v_bits, counts.v[i], r and r.v_rank)
            for i, (p, r) in enumerate(zip(plan.layers, latent, strict=True))
        )

    def run(self) -> pd.DataFrame:
        """Measure what is left on validation, choose per budget and family, measure the chosen
        points on test: one row per budget and family (the `point` column holds the Point)."""
        points = self.screened(self.points(self.base_models()))
        for point in tqdm(points, desc="byte front (validation)", disable=not self.progress):
            self._measure(point, VALID_SPLIT)
        chosen = self.choose(points)
        for row in tqdm(chosen, desc="byte front (test)", disable=not self.progress):
            row["test_ppl"] = self._measure(row["point"], TEST_SPLIT)
        return pd.DataFrame(chosen)

    def screened(self, points: list[Point]) -> list[Point]:
        """The points worth measuring under the config's `screen` (search.front_points.screened)."""
        return screened(points, self.config.budgets, self.source_bytes, self.config.screen)

    def choose(self, points: list[Point]) -> list[dict]:
        """Per budget and family, the point of least measured validation value that fits."""
        measured = self._measured()
        rows = choose(
            points,
            lambda p: measured[p.key, "valid_ppl"],
            self.config.budgets,
            self.source_bytes,
        )
        source = self.study.source_grouping.layers
        for row in rows:  # layers whose grouping is not the source's: grouped further
            layers = row["point"].model.grouping.layers
            row["grouped_layers"] = sum(a != b for a, b in zip(layers, source, strict=True))
        return rows


def front_frame(name: str, storage, windows: dict[str, str] | None = None) -> pd.DataFrame:
    """Every measured point of a study's byte front, one row per point (valid_ppl, test_ppl where
    measured), from the storage; with `windows` (KVFront.windows()), only measurements on those
    windows."""
    study = load_study(name + FRONT_SUFFIX, storage)
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if study else []
    rows: dict[str, dict] = {}
    for t in trials:
        attrs = dict(t.user_attrs)
        if windows is not None and attrs.get("windows") != windows[attrs["metric"]]:
            continue
        if "kind" in attrs:  # recorded before the attribute was named for what it says
            attrs.setdefault("cache", attrs.pop("kind"))
        skip = ("metric", "windows")
        row = rows.setdefault(attrs["key"], {k: v for k, v in attrs.items() if k not in skip})
        row[attrs["metric"]] = t.value
    return pd.DataFrame(list(rows.values()))
