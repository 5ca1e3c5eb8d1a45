"""`kmeans`: k-means on per-head activation features, with free (asymmetric) or equal group sizes.

Feature of query head h (K or V): its projection output on a fixed sample of calibration tokens,
a_h = X W_s(h)^T + b (N x D, bias included), flattened and L2-normalised, so k-means groups heads
whose keys (values) point the same way (as AsymGQA's activation similarity). For "kv" the
normalised K and V features are concatenated. Cost: one projection per layer and kind on
`tokens` tokens (memoised in the context), then scikit-learn KMeans on H points.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans as SklearnKMeans
from sklearn.exceptions import ConvergenceWarning

from gqa.grouping import Partition, partition_from_index
from search.strategies.base import SearchContext, Strategy, register_strategy


@register_strategy
@dataclass
class KMeans(Strategy):
    """balanced=False: free sizes, empty clusters fixed by splitting off the worst-fitting heads.
    balanced=True: sizes differ by at most one (H // G or H // G + 1), by capacity-constrained
    assignment (Hungarian on repeated centroids) alternated with centroid updates."""

    name = "kmeans"
    needs_stats = True

    n_init: int = 8  # k-means++ restarts; the lowest inertia wins
    tokens: int = 256  # calibration tokens the features are computed on
    balanced: bool = False
    max_iter: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_int("n_init", minimum=1)
        self.check_int("tokens", minimum=1)
        self.check_int("max_iter", minimum=1)
        if not isinstance(self.balanced, bool):
            self.fail("balanced", "must be True or False")

    def propose_partition(self, ctx, layer, kind, num_groups, rng) -> Partition:
        x = head_features(ctx, layer, kind, self.tokens)  # (H, F)
        with warnings.catch_warnings():
            # Heads that read the same source head are identical points (GQA sources): fewer
            # distinct points than clusters is expected, and repaired below.
            warnings.simplefilter("ignore", ConvergenceWarning)
            km = SklearnKMeans(
                n_clusters=num_groups,
                n_init=self.n_init,
                max_iter=self.max_iter,
                random_state=int(rng.integers(2**31 - 1)),
            ).fit(x)
        if self.balanced:
            labels = _balanced_labels(x, km.cluster_centers_, self.max_iter)
        else:
            labels = _fill_empty(x, km.labels_.copy(), num_groups)
        return partition_from_index(labels)


def head_features(ctx: SearchContext, layer: int, kind: str, tokens: int) -> np.ndarray:
    """(H, F) L2-normalised activation features of the query heads (see the module docstring)."""
    if kind == "kv":
        both = [head_features(ctx, layer, k, tokens) for k in ("k", "v")]
        return np.concatenate(both, axis=1) / np.sqrt(2.0)
    key = ("kmeans_features", layer, kind, tokens)
    if key not in ctx.memo:
        stats, adapter = ctx.require_stats("strategy 'kmeans'")
        inputs = stats.layers[layer].inputs
        if inputs.numel() == 0:
            raise ValueError(
                "strategy 'kmeans' needs sampled attention inputs: calibrate with sample_seqs > 0"
            )
        x = inputs.reshape(-1, inputs.shape[-1])  # (N, d)
        if x.shape[0] > tokens:  # a fixed token sample per layer: features belong to the model
            gen = np.random.default_rng(layer)
            x = x[torch.from_numpy(np.sort(gen.choice(x.shape[0], tokens, replace=False)))]
        proj = adapter.projection(layer, kind)
        with torch.no_grad():
            out = proj(x.to(device=proj.weight.device, dtype=proj.weight.dtype))  # (N, n_src*D)
        out = out.float().cpu().reshape(x.shape[0], -1, adapter.head_dim)  # (N, n_src, D)
        source = adapter.source_kv_index(layer, kind).cpu()
        feats = out[:, source].permute(1, 0, 2).reshape(len(source), -1).double().numpy()
        norms = np.linalg.norm(feats, axis=1, keepdims=True)
        ctx.memo[key] = feats / np.maximum(norms, 1e-30)
    return ctx.memo[key]


def _fill_empty(x: np.ndarray, labels: np.ndarray, num_groups: int) -> np.ndarray:
    """Relabel to 0..k-1, then while fewer than G clusters: move the head farthest from its
    centroid, in the cluster with the largest squared error among those with 2+ heads, out on
    its own."""
    _, labels = np.unique(labels, return_inverse=True)
    while labels.max() + 1 < num_groups:
        best = None
        for c in range(labels.max() + 1):
            members = np.flatnonzero(labels == c)
            if len(members) < 2:
                continue
            dist = ((x[members] - x[members].mean(0)) ** 2).sum(1)
            if best is None or dist.sum() > best[0]:
                best = (dist.sum(), members[int(np.argmax(dist))])
        labels[best[1]] = labels.max() + 1
    return labels


def _balanced_labels(x: np.ndarray, centers: np.ndarray, max_iter: int) -> np.ndarray:
    """Assignment with sizes H // G or H // G + 1, minimising the squared distance to centroids.

    Each centroid gets H // G mandatory slots and one optional slot priced with a large constant,
    so the optimal assignment fills every mandatory slot and exactly H % G optional ones."""
    h, g = x.shape[0], centers.shape[0]
    base, extra = divmod(h, g)
    labels = None
    for _ in range(max_iter):
        dist = ((x[:, None, :] - centers[None, :, :]) ** 2).sum(-1)  # (H, G)
        slots = [c for c in range(g) for _ in range(base)]
        cost = dist[:, slots]
        if extra:
            penalty = 1.0 + 2.0 * h * dist.max()
            cost = np.concatenate([cost, dist + penalty], axis=1)
            slots += list(range(g))
        rows, cols = linear_sum_assignment(cost)
        new = np.empty(h, dtype=int)
        new[rows] = np.asarray(slots)[cols]
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        centers = np.stack([x[labels == c].mean(0) for c in range(g)])
    return labels
