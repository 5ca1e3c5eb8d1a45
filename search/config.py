"""Study configuration: a TOML file that fully describes a study, validated before any work.

    [study]        name, storage (sqlite:///f.db | journal:f.log | postgresql://... | mysql://...), seed
    [model]        name (registered name, saved folder, or HF id)
    [calibration]  fields of objectives.calibration.CalibrationConfig
    [search]       budgets (average KV heads per layer, K and V each), proxy, merge, trials,
                   allocation (false, true, "kv" or a list searched over), objective
                   ("constrained"|"pareto"),
                   [search.strategies.NAME] with hyper-parameter ranges:
                       key = value            fixed
                       key = [a, b, c]        categorical
                       key = {low, high, log} int range if low and high are ints, else float range
                   rank_proxy (optional second proxy that ranks and re-ranks), rerank_top,
                   table_budget_gb (optional bound on the group tables kept in memory)
    [precision]    budgets (fractions of the source KV cache), bits, group_sizes, window (an int or
                   a list: full-precision windows to try), context (tokens at which cache bytes
                   are counted; 0: the selection's), valid_windows, test_windows, layer_mix,
                   screen, protect, latent_ranks: the byte front (search.kv_front)
    [selection]    objective: {task = weight}, over ppl and the long tasks (long_ppl, passkey,
                   mdqa): what stage 2 and the byte front select by on validation
                   (objectives.selection; default {ppl = 1})
    [long_context] fields of objectives.long_context.LongContextConfig (seq_len, ppl_windows,
                   buckets, lengths, depths, trials): the long tasks' settings
    [promote]      top_k, recovery ("none", a registered method, or a list run in order: the
                   rungs), [promote.recovery_config.METHOD] (that method's config fields),
                   valid_windows, pruner ("successive_halving" | "median" | "none"),
                   reduction_factor, tasks, limit, ppl_windows, seq_len, baselines
Errors name the offending key: `ConfigError: search.budgets: ...`.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gqa.precision import QUANTIZED_BITS
from objectives.calibration import CalibrationConfig
from objectives.long_context import LongContextConfig
from objectives.selection import SelectionObjective

KV_TOGETHER = "kv"  # a [search] allocation: one total of cached heads, divided between K and V too


class ConfigError(ValueError):
    """A study config is invalid; the message starts with the offending key."""


@dataclass(frozen=True)
class ParamSpace:
    """One hyper-parameter: fixed, categorical, or a numeric range."""

    name: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False

    @classmethod
    def parse(cls, key: str, name: str, value: Any) -> ParamSpace:
        if isinstance(value, list):
            if not value:
                raise ConfigError(f"{key}: an empty list of choices")
            return cls(name, choices=tuple(value))
        if isinstance(value, dict):
            unknown = set(value) - {"low", "high", "log"}
            if unknown or not {"low", "high"} <= set(value):
                raise ConfigError(
                    f"{key}: a range needs exactly 'low', 'high' and optionally 'log'"
                )
            low, high = value["low"], value["high"]
            if (
                not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (low, high))
                or low > high
            ):
                raise ConfigError(f"{key}: range needs numbers with low <= high")
            integer = isinstance(low, int) and isinstance(high, int)
            return cls(name, low=low, high=high, log=bool(value.get("log", False)), integer=integer)
        return cls(name, choices=(value,))

    def suggest(self, trial, prefix: str) -> Any:
        key = f"{prefix}.{self.name}"
        if self.choices is not None:
            if len(self.choices) == 1:
                return self.choices[0]
            return trial.suggest_categorical(key, list(self.choices))
        if self.integer:
            return trial.suggest_int(key, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(key, float(self.low), float(self.high), log=self.log)

    def values(self) -> tuple:
        """Every value this space can give (for validation)."""
        return self.choices if self.choices is not None else (self.low, self.high)


@dataclass(frozen=True)
class SearchConfig:
    budgets: tuple[float, ...]
    proxy: str = "fisher"
    merge: str = "aligned"
    trials: int = 60
    # Searched over: False spreads each budget evenly over the layers, True allocates it by error
    # curves, KV_TOGETHER also lets the curves divide it between K and V (search.Study.budget).
    allocation: tuple[bool | str, ...] = (False, True)
    objective: str = "constrained"
    strategies: dict[str, tuple[ParamSpace, ...]] = field(default_factory=dict)
    # A second proxy that ranks what the guide `proxy` found: it is the trials' objective and the
    # promotion order, re-ranks strategies' per-layer candidates, and drives allocation.
    rank_proxy: str | None = None
    rerank_top: int = 4  # per-layer candidates (by the guide proxy) the rank proxy re-ranks
    # GB of group tables the guide proxy keeps at once (None: all layers'); past it tables are
    # rebuilt when needed, same values (see objectives.proxies.base.GroupTableProxy)
    table_budget_gb: float | None = None


PRUNERS = ("successive_halving", "median", "none")
# The units of the byte front's joint allocation errors (PrecisionConfig.layer_costs).
LAYER_COSTS = ("proxy", "long_range")


@dataclass(frozen=True)
class PromoteConfig:
    top_k: int = 6
    recovery: tuple[str, ...] = ("layerwise",)  # run in order; () for none
    recovery_config: dict = field(default_factory=dict)  # method -> its config fields
    tasks: tuple[str, ...] = ("ppl", "arc_easy")
    limit: int | None = 100
    ppl_windows: int = 24
    seq_len: int = 256
    baselines: tuple[str, ...] = ("neighbour", "neighbour_kv")
    batch_size: int = 16
    valid_windows: int = 12  # validation windows scored at every rung (selection reads these)
    pruner: str = "successive_halving"  # per budget, on validation perplexity after each rung
    reduction_factor: int = 2


@dataclass(frozen=True)
class PrecisionConfig:
    """The byte front (search.kv_front): KV-cache precision searched with the grouping."""

    budgets: tuple[float, ...] = ()  # fractions of the source's 16-bit cache; () = no byte front
    bits: tuple[int, ...] = tuple(sorted(QUANTIZED_BITS, reverse=True))  # allowed besides 16
    group_sizes: tuple[int, ...] = (32,)  # uniform baselines try each; allocation uses the first
    # Full-precision windows of recent tokens (KIVI's residual) to try: the uniform baselines
    # try each, and the allocations run once per window. Their bytes count (see `context`).
    windows: tuple[int, ...] = (0,)
    # Tokens at which cache bytes are counted (search.byte_allocation.ByteCounting: the window
    # and the last partial block at 16 bits); 0: the selection's context
    # (StudyConfig.selection_context).
    context: int = 0
    valid_windows: int = 4  # validation windows that choose between points
    test_windows: int = 12  # test windows for the chosen points
    layer_mix: bool = True  # the joint allocation may take each layer from a different model
    # Per budget and family, how many fitting points (least proxy error first) are measured on
    # validation; 0 measures every point.
    screen: int = 0
    # Per stage-2 winner, the layers of highest long-range cost (objectives.long_range, measured
    # on validation at [long_context] settings) that the joint layer mixes keep from the source.
    protect: int = 0
    # The units of the joint allocation's per-layer errors (LAYER_COSTS): "proxy", the
    # short-window Fisher-weighted output changes; "long_range", nats of late-bucket NLL: each
    # winner's layers cost what they cost at long range (objectives.long_range, scaled to add up
    # to the whole winner's cost), and the quantization (and latent) errors are converted at a
    # rate measured on the source's uniform settings (objectives.long_range.nats_per_unit).
    layer_costs: str = "proxy"
    # Latent K/V ranks (gqa.latent) the byte front may give the source's layers: a `latent`
    # family (ranks allocated per layer, 16-bit cache) and latent options in the joint layer mixes;
    # () = none.
    latent_ranks: tuple[int, ...] = ()


@dataclass(frozen=True)
class StudyConfig:
    name: str
    storage: str
    model: str
    seed: int
    calibration: CalibrationConfig
    search: SearchConfig
    promote: PromoteConfig
    path: Path | None = None
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    selection: SelectionObjective = field(default_factory=SelectionObjective)

    @property
    def long_context(self) -> LongContextConfig:
        return self.selection.long_context

    @property
    def selection_context(self) -> int:
        """The tokens selection reads: the short windows' length for the short perplexity, else
        the long documents' (`[long_context] seq_len`)."""
        return self.promote.seq_len if self.selection.is_short_ppl else self.long_context.seq_len

    @property
    def byte_context(self) -> int:
        """The tokens at which the byte front counts cache bytes (`precision.context`, else the
        selection's context)."""
        return self.precision.context or self.selection_context

    @classmethod
    def load(cls, path: str | Path) -> StudyConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        try:
            return cls.from_dict(data, path)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    @classmethod
    def from_dict(cls, data: dict, path: Path | None = None) -> StudyConfig:
        _only(
            data,
            "",
            {
                "study",
                "model",
                "calibration",
                "search",
                "promote",
                "precision",
                "selection",
                "long_context",
            },
        )
        study = _section(data, "study", required=True)
        _only(study, "study", {"name", "storage", "seed"})
        model = _section(data, "model", required=True)
        _only(model, "model", {"name"})
        name = _get(study, "study.name", str)
        storage = _get(study, "study.storage", str, f"sqlite:///results/{name}/study.db")
        seed = _get(study, "study.seed", int, 0)
        calibration = _dataclass_from(
            CalibrationConfig, _section(data, "calibration"), "calibration"
        )
        search = _search(_section(data, "search", required=True))
        promote = _promote(_section(data, "promote"))
        precision = _precision(_section(data, "precision"))
        selection = _selection(_section(data, "selection"), _section(data, "long_context"))
        return cls(
            name=name,
            storage=storage,
            model=_get(model, "model.name", str),
            seed=seed,
            calibration=calibration,
            search=search,
            promote=promote,
            path=path,
            precision=precision,
            selection=selection,
        )


# -- parsing helpers --------------------------------------------------------------------------


def _section(data: dict, key: str, required: bool = False) -> dict:
    value = data.get(key)
    if value is None:
        if required:
            raise ConfigError(f"{key}: missing section [{key}]")
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a table")
    return value


def _only(table: dict, prefix: str, allowed: set[str]) -> None:
    for key in table:
        if key not in allowed:
            where = f"{prefix}.{key}" if prefix else key
            raise ConfigError(f"{where}: unknown key (allowed: {', '.join(sorted(allowed))})")


def _get(table: dict, key: str, kind: type | tuple, default: Any = dataclasses.MISSING) -> Any:
    name = key.rsplit(".", 1)[-1]
    if name not in table:
        if default is dataclasses.MISSING:
            raise ConfigError(f"{key}: required")
        return default
    value = table[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ConfigError(f"{key}: expected {names}, got {value!r}")
    return value


def _dataclass_from(cls: type, table: dict, prefix: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    _only(table, prefix, set(fields))
    try:
        return cls(**table)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix}: {exc}") from None


def _names(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value) or not value:
        raise ConfigError(f"{key}: expected a non-empty list of names")
    return tuple(value)


def _search(table: dict) -> SearchConfig:
    from gqa.merge import MERGES
    from objectives.proxies import PROXIES
    from objectives.proxies.base import GroupTableProxy
    from search.strategies import STRATEGIES

    _only(
        table,
        "search",
        {
            "budgets",
            "proxy",
            "merge",
            "trials",
            "allocation",
            "objective",
            "strategies",
            "rank_proxy",
            "rerank_top",
            "table_budget_gb",
        },
    )
    budgets = _get(table, "search.budgets", list)
    if not budgets or not all(
        isinstance(b, int | float) and not isinstance(b, bool) and b >= 1 for b in budgets
    ):
        raise ConfigError(
            "search.budgets: expected a non-empty list of numbers >= 1 (KV heads per layer)"
        )
    proxy = _get(table, "search.proxy", str, "fisher")
    if proxy not in PROXIES:
        raise ConfigError(
            f"search.proxy: unknown proxy {proxy!r} (available: {', '.join(sorted(PROXIES))})"
        )
    merge = _get(table, "search.merge", str, SearchConfig.merge)
    if merge not in MERGES:
        raise ConfigError(
            f"search.merge: unknown merge {merge!r} (available: {', '.join(sorted(MERGES))})"
        )
    rank_proxy = table.get("rank_proxy")
    if rank_proxy is not None and rank_proxy not in PROXIES:
        raise ConfigError(
            f"search.rank_proxy: unknown proxy {rank_proxy!r} (available: {', '.join(sorted(PROXIES))})"
        )
    rerank_top = _get(table, "search.rerank_top", int, 4)
    if rerank_top < 1:
        raise ConfigError("search.rerank_top: must be at least 1")
    table_budget_gb = _get(table, "search.table_budget_gb", (int, float), None)
    if table_budget_gb is not None and not table_budget_gb > 0:
        raise ConfigError("search.table_budget_gb: must be positive")
    if table_budget_gb is not None and not issubclass(PROXIES[proxy], GroupTableProxy):
        raise ConfigError(f"search.table_budget_gb: proxy {proxy!r} keeps no group tables")
    trials = _get(table, "search.trials", int, 60)
    if trials < 1:
        raise ConfigError("search.trials: must be at least 1")
    allocation = table.get("allocation", [False, True])
    if isinstance(allocation, bool | str):
        allocation = [allocation]
    if (
        not isinstance(allocation, list)
        or not allocation
        or not all(isinstance(a, bool) or a == KV_TOGETHER for a in allocation)
    ):
        raise ConfigError(
            f"search.allocation: expected true, false or {KV_TOGETHER!r}, or a list of them, "
            f"got {allocation!r}"
        )
    objective = _get(table, "search.objective", str, "constrained")
    if objective not in ("constrained", "pareto"):
        raise ConfigError("search.objective: expected 'constrained' or 'pareto'")
    strategies_table = _get(table, "search.strategies", dict, {name: {} for name in STRATEGIES})
    strategies = {}
    for name, params in strategies_table.items():
        key = f"search.strategies.{name}"
        if name not in STRATEGIES:
            raise ConfigError(
                f"{key}: unknown strategy (available: {', '.join(sorted(STRATEGIES))})"
            )
        if not isinstance(params, dict):
            raise ConfigError(f"{key}: must be a table of hyper-parameters")
        fields = {f.name: f for f in dataclasses.fields(STRATEGIES[name])}
        spaces = []
        for pname, value in params.items():
            if pname not in fields or pname == "seed":
                allowed = ", ".join(sorted(f for f in fields if f != "seed"))
                raise ConfigError(f"{key}.{pname}: unknown hyper-parameter (allowed: {allowed})")
            spaces.append(ParamSpace.parse(f"{key}.{pname}", pname, value))
        for space in spaces:  # every value must build a valid strategy
            for value in space.values():
                try:
                    STRATEGIES[name](**{space.name: int(value) if space.integer else value})
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"{key}.{space.name}: {exc}") from None
        strategies[name] = tuple(spaces)
    if not strategies:
        raise ConfigError("search.strategies: at least one strategy is needed")
    return SearchConfig(
        budgets=tuple(float(b) for b in budgets),
        proxy=proxy,
        merge=merge,
        trials=trials,
        allocation=tuple(allocation),
        objective=objective,
        strategies=strategies,
        rank_proxy=rank_proxy,
        rerank_top=rerank_top,
        table_budget_gb=table_budget_gb,
    )


def _precision(table: dict) -> PrecisionConfig:
    allowed = {f.name for f in dataclasses.fields(PrecisionConfig)} - {"windows"} | {"window"}
    _only(table, "precision", allowed)
    defaults = PrecisionConfig()
    budgets = _get(table, "precision.budgets", list, list(defaults.budgets))
    if not all(
        isinstance(b, int | float) and not isinstance(b, bool) and 0 < b <= 1 for b in budgets
    ):
        raise ConfigError(
            "precision.budgets: expected fractions of the source KV cache in (0, 1], e.g. 0.25"
        )
    bits = _get(table, "precision.bits", list, list(defaults.bits))
    if not bits or not all(isinstance(b, int) and b in QUANTIZED_BITS for b in bits):
        raise ConfigError(
            f"precision.bits: expected a non-empty list from {list(QUANTIZED_BITS)}, got {bits}"
        )
    groups = _get(table, "precision.group_sizes", list, list(defaults.group_sizes))
    if not groups or not all(
        isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in groups
    ):
        raise ConfigError("precision.group_sizes: expected a non-empty list of positive integers")
    window = table.get("window", list(defaults.windows))
    windows = window if isinstance(window, list) else [window]
    if not windows or not all(
        isinstance(w, int) and not isinstance(w, bool) and w >= 0 for w in windows
    ):
        raise ConfigError(
            f"precision.window: expected a token count >= 0 or a non-empty list of them, got "
            f"{window!r}"
        )
    numbers = {"windows": tuple(dict.fromkeys(windows))}
    for name in ("context", "valid_windows", "test_windows", "screen", "protect"):
        value = _get(table, f"precision.{name}", int, getattr(defaults, name))
        least = 0 if name in ("context", "screen", "protect") else 1
        if value < least:
            raise ConfigError(f"precision.{name}: must be >= {least}")
        numbers[name] = value
    numbers["layer_mix"] = _get(table, "precision.layer_mix", bool, defaults.layer_mix)
    layer_costs = _get(table, "precision.layer_costs", str, defaults.layer_costs)
    if layer_costs not in LAYER_COSTS:
        raise ConfigError(
            f"precision.layer_costs: expected one of {', '.join(LAYER_COSTS)}, got {layer_costs!r}"
        )
    numbers["layer_costs"] = layer_costs
    ranks = _get(table, "precision.latent_ranks", list, list(defaults.latent_ranks))
    if not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks):
        raise ConfigError(f"precision.latent_ranks: expected positive integers, got {ranks}")
    numbers["latent_ranks"] = tuple(sorted(set(ranks)))
    return PrecisionConfig(
        budgets=tuple(sorted((float(b) for b in budgets), reverse=True)),
        bits=tuple(sorted(set(bits), reverse=True)),
        group_sizes=tuple(groups),
        **numbers,
    )


def _selection(table: dict, long_context: dict) -> SelectionObjective:
    _only(table, "selection", {"objective"})
    long_config = _dataclass_from(LongContextConfig, long_context, "long_context")
    weights = _get(table, "selection.objective", dict, {"ppl": 1.0})
    try:
        return SelectionObjective.of(weights, long_config)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"selection.objective: {exc}") from None


def _promote(table: dict) -> PromoteConfig:
    from objectives.evaluate import SCORED_TASKS, TASKS
    from objectives.recovery import RECOVERIES
    from search.strategies import STRATEGIES

    allowed = {f.name for f in dataclasses.fields(PromoteConfig)}
    _only(table, "promote", allowed)
    defaults = PromoteConfig()
    top_k = _get(table, "promote.top_k", int, defaults.top_k)
    if top_k < 0:
        raise ConfigError("promote.top_k: must be >= 0")
    recovery = table.get("recovery", list(defaults.recovery))
    recovery = [] if recovery == "none" else [recovery] if isinstance(recovery, str) else recovery
    if not isinstance(recovery, list) or not all(isinstance(r, str) for r in recovery):
        raise ConfigError("promote.recovery: expected 'none', a method name or a list of them")
    for method in recovery:
        if method not in RECOVERIES:
            raise ConfigError(
                f"promote.recovery: unknown method {method!r} (available: none, {', '.join(sorted(RECOVERIES))})"
            )
    recovery_config = _get(table, "promote.recovery_config", dict, {})
    for method, fields in recovery_config.items():
        key = f"promote.recovery_config.{method}"
        if method not in recovery:
            raise ConfigError(f"{key}: {method!r} is not in promote.recovery")
        if not isinstance(fields, dict):
            raise ConfigError(f"{key}: must be a table of {method} settings")
        _dataclass_from(RECOVERIES[method].config_class, fields, key)
    tasks = _names(table.get("tasks", list(defaults.tasks)), "promote.tasks")
    for task in tasks:
        if task != "ppl" and task not in TASKS and task not in SCORED_TASKS:
            available = ", ".join(["ppl", *sorted(TASKS), *sorted(SCORED_TASKS)])
            raise ConfigError(f"promote.tasks: unknown task {task!r} (available: {available})")
    limit = table.get("limit", defaults.limit)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ConfigError("promote.limit: expected a positive integer")
    baselines = _names(table.get("baselines", list(defaults.baselines)), "promote.baselines")
    for name in baselines:
        if name not in STRATEGIES:
            raise ConfigError(f"promote.baselines: unknown strategy {name!r}")
    ints = {
        k: _get(table, f"promote.{k}", int, getattr(defaults, k))
        for k in ("ppl_windows", "seq_len", "batch_size", "valid_windows", "reduction_factor")
    }
    if ints["reduction_factor"] < 2:
        raise ConfigError("promote.reduction_factor: must be at least 2")
    pruner = _get(table, "promote.pruner", str, defaults.pruner)
    if pruner not in PRUNERS:
        raise ConfigError(f"promote.pruner: expected one of {', '.join(PRUNERS)}, got {pruner!r}")
    for key, value in ints.items():
        if value < 1:
            raise ConfigError(f"promote.{key}: must be at least 1")
    return PromoteConfig(
        top_k=top_k,
        recovery=tuple(recovery),
        recovery_config=recovery_config,
        tasks=tasks,
        limit=limit,
        baselines=baselines,
        pruner=pruner,
        **ints,
    )
