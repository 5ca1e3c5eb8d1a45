"""Model surgery: convert a Hugging Face causal LM (MHA or GQA) to a `Grouping`.

For each layer and for K and V separately, every new group head is a merge (by default the
mean) of the source K/V slices that the group's query heads read. `k_proj`/`v_proj` are replaced
by projections that output only the group heads, and the grouped attention function maps them
onto the query heads after the cache update (see `gqa.attention`).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable

import torch
from torch import nn

from gqa import attention
from gqa.adapters import ModelAdapter, get_adapter
from gqa.adapters.base import new_linear
from gqa.grouping import Grouping, GroupingError, LayerGrouping
from gqa.merge import FOLDING, MergeContext, get_merge

CONFIG_KEY = "headgroup"  # the grouping, stored in the model config (and so in config.json)


def model_grouping(model: nn.Module) -> Grouping | None:
    """The grouping a converted model carries, or None for a stock model."""
    data = getattr(model.config, CONFIG_KEY, None)
    return None if data is None else Grouping.from_dict(data)


def current_grouping(model: nn.Module) -> Grouping:
    """The grouping a model has now; for a stock model, its own GQA (or MHA) layout."""
    grouping = model_grouping(model)
    if grouping is not None:
        return grouping
    adapter = get_adapter(model)
    k = [_index_to_groups(adapter.source_kv_index(i, "k")) for i in range(adapter.num_layers)]
    v = [_index_to_groups(adapter.source_kv_index(i, "v")) for i in range(adapter.num_layers)]
    return Grouping.create(adapter.num_heads, k, v)


def _index_to_groups(index: torch.Tensor) -> list[list[int]]:
    groups: dict[int, list[int]] = {}
    for head, g in enumerate(index.tolist()):
        groups.setdefault(g, []).append(head)
    return list(groups.values())


def _merged_projection(
    adapter: ModelAdapter, layer: int, which: str, groups, merge, stats
) -> nn.Linear:
    source = adapter.source_kv_index(layer, which)
    weights, biases = adapter.head_slices(layer, which)
    merged_w, merged_b, frames = [], [], {}
    for heads in groups:
        members = source[list(heads)]
        ctx = MergeContext(
            layer=layer, kind=which, heads=tuple(heads), adapter=adapter, stats=stats
        )
        w, b, *rotations = merge(weights[members], None if biases is None else biases[members], ctx)
        merged_w.append(w)
        merged_b.append(b)
        if rotations:
            frames.update(zip(heads, rotations[0], strict=True))
    old = adapter.projection(layer, which)
    linear = new_linear(old, len(groups) * adapter.head_dim)
    linear.weight.copy_(torch.cat(merged_w).to(linear.weight.dtype))
    if linear.bias is not None:
        linear.bias.copy_(torch.cat(merged_b).to(linear.bias.dtype))
    return linear, frames


@torch.no_grad()
def merged_projections(
    adapter: ModelAdapter, layer: int, grouping: LayerGrouping, merge: str = "mean", stats=None
) -> tuple[nn.Linear, nn.Linear, dict[str, dict[int, torch.Tensor]]]:
    """The K and V projections one layer gets under `grouping`, without touching the model, and
    the frames a folding merge asks to fold per kind and query head (empty otherwise)."""
    merge_fn = get_merge(merge)
    k, k_frames = _merged_projection(adapter, layer, "k", grouping.k, merge_fn, stats)
    v, v_frames = _merged_projection(adapter, layer, "v", grouping.v, merge_fn, stats)
    return k, v, {"k": k_frames, "v": v_frames}


def _fold_frames(adapter: ModelAdapter, module: nn.Module, frames: dict) -> None:
    """Fold each query head's frames into `module`'s own q rows (K: W_q,h <- R_h W_q,h, and its
    bias) and o columns (V: W_o[:, h] <- W_o[:, h] R_h^T): q.k and o(v) are unchanged."""
    d = adapter.head_dim
    for which, kind in (("q", "k"), ("o", "v")):
        if not frames[kind]:
            continue
        proj = adapter.module_projection(module, which)
        if type(proj) is not nn.Linear:
            raise ValueError(
                f"a folding merge needs linear {which} projections; "
                f"{adapter.config.model_type} has {type(proj).__name__}"
            )
        for head, rotation in frames[kind].items():
            rows = slice(head * d, (head + 1) * d)
            r = rotation.to(proj.weight)
            if which == "q":
                proj.weight[rows] = r @ proj.weight[rows]
                if proj.bias is not None:
                    proj.bias[rows] = r @ proj.bias[rows]
            else:
                proj.weight[:, rows] = proj.weight[:, rows] @ r.T


@torch.no_grad()
def regroup_module(
    adapter: ModelAdapter,
    layer: int,
    module: nn.Module,
    grouping: LayerGrouping,
    merge: str = "mean",
    stats=None,
) -> nn.Module:
    """Give `module` (layer `layer`'s attention, or a copy of it) the merged K/V projections,
    K-width norms and head plan of `grouping`."""
    k, v, frames = merged_projections(adapter, layer, grouping, merge, stats)
    adapter.regroup_norms(module, layer, grouping.k, k)
    adapter.set_module_projection(module, "k", k)
    adapter.set_module_projection(module, "v", v)
    _fold_frames(adapter, module, frames)
    attention.install_plan(module, grouping, adapter.num_heads)
    return module


@torch.no_grad()
def converted_attention(
    adapter: ModelAdapter, layer: int, grouping: LayerGrouping, merge: str = "mean", stats=None
) -> nn.Module:
    """A standalone copy of one attention layer converted to `grouping` (the model is untouched),
    for layer-local errors and fits; run it with `adapter.attend`."""
    module = copy.deepcopy(adapter.attention(layer))
    module.config = copy.copy(module.config)
    impl = attention.grouped_implementation(module.config._attn_implementation)
    module.config._attn_implementation = impl  # the model's eager or sdpa, grouped
    return regroup_module(adapter, layer, module, grouping, merge, stats)


@torch.no_grad()
def converted_copy(
    model: nn.Module,
    grouping: Grouping,
    merge: str = "mean",
    stats: object = None,
    own: Iterable[str] | str = ("q", "o"),
) -> nn.Module:
    """A copy of `model` converted to `grouping`; `model` is untouched.

    The copy's K and V projections are new (the merge makes them), as are the attention
    projections named in `own` (those that recovery may train) and the rest of each attention
    module. Every other tensor (embeddings, MLPs, norms, unowned q/o) is `model`'s own, so a copy
    of a 7B model costs a few hundred MB instead of 13 GB. Train only projections the copy owns:
    training a shared tensor would change `model` too. `own="all"` makes a full deep copy. A merge
    that folds frames into q and o (gqa.merge.FOLDING) always gets its own q and o."""
    adapter = get_adapter(model)
    memo: dict[int, object] = {}
    if own != "all" and merge in FOLDING:
        own = tuple(sorted({*own, "q", "o"}))
    if own != "all":
        check = set(own) - {"q", "o"}
        if check:
            raise ValueError(f"own names q/o projections (k and v are always new), got {check}")
        shared = list(itertools.chain(model.parameters(), model.buffers()))
        private = set()
        for i in range(adapter.num_layers):
            module = adapter.attention(i)
            private |= {id(t) for t in itertools.chain(module.parameters(), module.buffers())}
            for which in {"q", "o"} - set(own):  # real submodules only (not views of fused qkv)
                projection = adapter.module_projection(module, which)
                if any(projection is m for m in module.modules()):
                    private -= {id(t) for t in projection.parameters()}
        memo = {id(t): t for t in shared if id(t) not in private}
    return convert(copy.deepcopy(model, memo), grouping, merge, stats)


def _mark_converted(model: nn.Module, grouping: Grouping) -> None:
    setattr(model.config, CONFIG_KEY, grouping.to_dict())
    implementation = attention.grouped_implementation(model.config._attn_implementation)
    model.set_attn_implementation(implementation)


@torch.no_grad()
def convert(
    model: nn.Module, grouping: Grouping, merge: str = "mean", stats: object = None
) -> nn.Module:
    """Convert `model` in place to `grouping` and return it."""
    adapter = get_adapter(model)
    grouping.check_model(adapter.num_layers, adapter.num_heads)
    get_merge(merge)  # fail on an unknown name before any change
    for layer, layer_grouping in enumerate(grouping.layers):
        regroup_module(adapter, layer, adapter.attention(layer), layer_grouping, merge, stats)
    _mark_converted(model, grouping)
    return model


def apply_layout(model: nn.Module, grouping: Grouping) -> nn.Module:
    """Give `model` the shapes and plan of `grouping` without merging (weights are loaded next)."""
    adapter = get_adapter(model)
    grouping.check_model(adapter.num_layers, adapter.num_heads)
    for layer, layer_grouping in enumerate(grouping.layers):
        adapter.layout_layer(layer, layer_grouping.k, layer_grouping.v)
        attention.install_plan(adapter.attention(layer), layer_grouping, adapter.num_heads)
    _mark_converted(model, grouping)
    return model


def _permute_heads_(tensor: torch.Tensor | None, order: list[int], head_dim: int, dim: int) -> None:
    """Reorder whole heads of a weight or bias, in place, along `dim`."""
    if tensor is None:
        return
    index = torch.tensor(
        [h * head_dim + i for h in order for i in range(head_dim)], device=tensor.device
    )
    tensor.copy_(tensor.index_select(dim, index))


@torch.no_grad()
def permute_query_heads(
    model: nn.Module, orders: list[list[int]], with_kv: bool = False
) -> nn.Module:
    """Reorder query heads in place (new head p of layer l = old head orders[l][p]) by permuting
    q_proj outputs and o_proj inputs, which leaves the model's function unchanged. With
    `with_kv` (stock MHA models) K/V heads move along; otherwise the caller fixes the K/V map."""
    adapter = get_adapter(model)
    d = adapter.head_dim
    for layer, order in enumerate(orders):
        outputs = [adapter.projection(layer, w) for w in ("q", "k", "v")[: 3 if with_kv else 1]]
        for tensor in [t for p in outputs for t in (p.weight, p.bias)]:
            _permute_heads_(tensor, order, d, dim=0)
        for tensor in adapter.query_head_tensors(layer):
            _permute_heads_(tensor, order, d, dim=0)
        _permute_heads_(adapter.output_weight(layer), order, d, dim=1)
    return model


@torch.no_grad()
def to_plain_gqa(model: nn.Module) -> nn.Module:
    """Rewrite, in place, a converted model whose grouping is uniform (shared K/V partition, equal
    group sizes, the same G everywhere) as a stock HF GQA model: query heads are reordered so each
    group is contiguous, then `num_key_value_heads = G`."""
    grouping = model_grouping(model)
    if grouping is None:
        return model
    if not grouping.is_uniform_shared():
        raise GroupingError("only a uniform grouping with shared K/V partitions is plain HF GQA")
    adapter = get_adapter(model)
    if not adapter.stock_gqa:
        raise GroupingError(
            f"stock transformers has no GQA for model_type {model.config.model_type!r}; "
            "expand_to_mha exports it at full KV cost"
        )
    num_groups = grouping.layers[0].num_k_groups
    orders = [[head for group in layer.k for head in group] for layer in grouping.layers]
    permute_query_heads(model, orders)
    for layer in range(adapter.num_layers):
        attention.remove_plan(adapter.attention(layer), adapter.num_heads // num_groups)
        adapter.to_stock(layer)
    model.config.num_key_value_heads = num_groups
    delattr(model.config, CONFIG_KEY)
    model.set_attn_implementation(attention.base_implementation(model.config._attn_implementation))
    return model


@torch.no_grad()
def expand_to_mha(model: nn.Module) -> nn.Module:
    """Rewrite a model, in place, as the exactly equivalent stock MHA model: every query head gets
    its own copy of the K/V head it reads. Works for stock GQA and for converted models (a way to
    export a grouping to runtimes that know nothing of headgroup, at full KV cost)."""
    adapter = get_adapter(model)
    converted = model_grouping(model) is not None
    for layer in range(adapter.num_layers):
        adapter.expand_norms(adapter.attention(layer), adapter.source_kv_index(layer, "k"))
        for which in ("k", "v"):
            source = adapter.source_kv_index(layer, which)
            weights, biases = adapter.head_slices(layer, which)
            old = adapter.projection(layer, which)
            linear = new_linear(old, adapter.num_heads * adapter.head_dim)
            linear.weight.copy_(weights[source].reshape(-1, old.in_features))
            if biases is not None:
                linear.bias.copy_(biases[source].reshape(-1))
            adapter.set_projection(layer, which, linear)
        if converted:
            attention.remove_plan(adapter.attention(layer), 1)
        adapter.attention(layer).num_key_value_groups = 1
        adapter.to_stock(layer)
    model.config.num_key_value_heads = adapter.num_heads
    if converted:
        delattr(model.config, CONFIG_KEY)
        model.set_attn_implementation(
            attention.base_implementation(model.config._attn_implementation)
        )
    return model
