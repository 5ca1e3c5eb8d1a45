"""Calibration statistics: one pass of the source model over calibration text, stored on disk.

Per layer l (X: the attention input, N tokens, d = hidden size, D = head_dim, H query heads):
  mean        mu = E[x]                                   (d,)
  gram        C = E[x x^T] = X^T X / N                    (d, d)
  query       S_h = E[q_h q_h^T], q_h = W_q,h x (pre-RoPE) (H, D, D)
  grad        F = E[g g^T], g = dLoss/d(attention output)  (d, d)   (one backward pass)
  inputs      a sample of whole calibration sequences of X (n_seq, T, d), for layer-local checks
              and activation features (K/V of each head on these tokens).
Statistics are streamed (running sums in float64), so memory does not grow with the token count.
They are saved under a key of (model, data, tokens, seed) in $HEADGROUP_CACHE/calibration and
reused by later runs and by every worker of a study.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from gqa.adapters import get_adapter
from gqa.assets import cache_dir
from gqa.grouping import write_atomic
from objectives.data import TextSpec, token_windows

log = logging.getLogger(__name__)
STATS_VERSION = 1


@dataclass(frozen=True)
class CalibrationConfig:
    """What to calibrate on. Changing any field changes the cache key."""

    seq_len: int = 256
    num_seqs: int = 32
    grad_seqs: int = 8  # sequences used for the backward pass (0: no gradient statistics)
    sample_seqs: int = 4  # whole sequences of attention inputs kept per layer
    split: str = "calibration"
    seed: int = 0
    batch_size: int = 4

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ValueError(f"calibration seed must be >= 0, got {self.seed}")
        for name in ("seq_len", "num_seqs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"calibration {name} must be at least 1, got {getattr(self, name)}"
                )
        for name in ("grad_seqs", "sample_seqs"):
            if not 0 <= getattr(self, name) <= self.num_seqs:
                raise ValueError(f"calibration {name} must be in 0..num_seqs ({self.num_seqs})")


@dataclass
class LayerStats:
    mean: torch.Tensor  # (d,)
    gram: torch.Tensor  # (d, d)
    query: torch.Tensor  # (H, D, D)
    grad: torch.Tensor | None  # (d, d)
    inputs: torch.Tensor  # (n_seq, T, d)

    @property
    def covariance(self) -> torch.Tensor:
        return self.gram - torch.outer(self.mean, self.mean)


@dataclass
class CalibrationStats:
    layers: list[LayerStats]
    token_ids: torch.Tensor  # (sample_seqs, T): the sequences whose inputs are kept
    tokens: int
    config: CalibrationConfig
    model: str

    def save(self, path: Path) -> None:
        state = {
            "version": STATS_VERSION,
            "layers": [asdict(layer) for layer in self.layers],
            "token_ids": self.token_ids,
            "tokens": self.tokens,
            "config": asdict(self.config),
            "model": self.model,
        }
        write_atomic(path, lambda tmp: torch.save(state, tmp))

    @classmethod
    def load(cls, path: Path) -> CalibrationStats:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data.get("version") != STATS_VERSION:
            raise ValueError(
                f"{path}: calibration statistics version {data.get('version')} is stale"
            )
        return cls(
            layers=[LayerStats(**layer) for layer in data["layers"]],
            token_ids=data["token_ids"],
            tokens=data["tokens"],
            config=CalibrationConfig(**data["config"]),
            model=data["model"],
        )


def model_fingerprint(model: nn.Module) -> str:
    """A cheap hash of the weights, so that stats of a changed model are never reused."""
    digest = hashlib.sha1()
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        digest.update(name.encode())
        digest.update(repr(tuple(param.shape)).encode())
        digest.update(flat[:: max(1, flat.numel() // 64)].to(torch.float64).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def cache_path(model: nn.Module, model_name: str, config: CalibrationConfig) -> Path:
    key = json.dumps(
        {
            "v": STATS_VERSION,
            "model": model_name,
            "weights": model_fingerprint(model),
            **asdict(config),
        },
        sort_keys=True,
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:20]
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model_name)[-40:]
    return cache_dir() / "calibration" / f"{safe}-{digest}.pt"


class _Collector:
    """Forward hooks on each attention module: accumulate input moments and query moments."""

    def __init__(self, model: nn.Module, config: CalibrationConfig):
        self.adapter = get_adapter(model)
        a = self.adapter
        d, h, hd = a.hidden_size, a.num_heads, a.head_dim
        f64 = dict(dtype=torch.float64, device="cpu")
        self.sum_x = [torch.zeros(d, **f64) for _ in range(a.num_layers)]
        self.sum_xx = [torch.zeros(d, d, **f64) for _ in range(a.num_layers)]
        self.sum_qq = [torch.zeros(h, hd, hd, **f64) for _ in range(a.num_layers)]
        # allocated by the backward pass, after the forward pass's sums became float32 grams
        self.sum_gg: list[torch.Tensor | None] = [None] * a.num_layers
        self.samples: list[list[torch.Tensor]] = [[] for _ in range(a.num_layers)]
        self.sample_seqs = config.sample_seqs
        self.tokens = 0
        self.grad_tokens = 0
        self.collect_inputs = True

    def input_hook(self, layer: int):
        def hook(module, args, kwargs):
            if not self.collect_inputs:
                return
            x = kwargs.get("hidden_states", args[0] if args else None).detach()  # (B, T, d)
            flat = x.reshape(-1, x.shape[-1]).to(torch.float64).cpu()
            self.sum_x[layer] += flat.sum(0)
            self.sum_xx[layer] += flat.T @ flat
            q = self.adapter.projection(layer, "q")(x).detach()  # (B, T, H*D)
            q = q.reshape(-1, self.adapter.num_heads, self.adapter.head_dim).to(torch.float64).cpu()
            self.sum_qq[layer] += torch.einsum("nhi,nhj->hij", q, q)
            kept = sum(s.shape[0] for s in self.samples[layer])
            if kept < self.sample_seqs:
                self.samples[layer].append(x[: self.sample_seqs - kept].float().cpu())

        return hook

    def grad_hook(self, layer: int):
        def hook(module, grad_input, grad_output):
            g = (
                grad_output[0]
                .detach()
                .reshape(-1, grad_output[0].shape[-1])
                .to(torch.float64)
                .cpu()
            )
            if self.sum_gg[layer] is None:
                self.sum_gg[layer] = torch.zeros(g.shape[1], g.shape[1], dtype=torch.float64)
            self.sum_gg[layer] += g.T @ g

        return hook


def collect(
    model: nn.Module,
    tokenizer,
    config: CalibrationConfig = CalibrationConfig(),  # noqa: B008  (frozen dataclass)
    model_name: str = "model",
    progress: bool = True,
) -> CalibrationStats:
    """Run the calibration pass (forward over all sequences, backward over `grad_seqs`)."""
    # Seed s takes the s-th block of num_seqs windows: different seeds see disjoint text.
    spec = TextSpec(config.split, config.seq_len, config.num_seqs * (config.seed + 1))
    windows = token_windows(tokenizer, spec)[config.num_seqs * config.seed :]
    device = next(model.parameters()).device
    collector = _Collector(model, config)
    adapter = collector.adapter
    handles = []
    for layer in range(adapter.num_layers):
        attn = adapter.attention(layer)
        handles.append(
            attn.register_forward_pre_hook(collector.input_hook(layer), with_kwargs=True)
        )
        handles.append(
            adapter.projection(layer, "o").register_full_backward_hook(collector.grad_hook(layer))
        )
    was_training = model.training
    model.eval()
    batches = windows.split(config.batch_size)
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="calibration forward", disable=not progress):
                model(input_ids=batch.to(device))
                collector.tokens += batch.numel()
        collector.collect_inputs = False
        # The forward sums are final: turn them into float32 grams now, freeing each layer's
        # float64 sum, so the backward pass's sums never sit next to them (at 7B shape each
        # is 128 MB a layer: 8 GB for both kinds over 32 layers, now at most 6 GB).
        grams = []
        for layer in range(adapter.num_layers):
            grams.append((collector.sum_xx[layer] / collector.tokens).float())
            collector.sum_xx[layer] = None
        grad_batches = (
            windows[: config.grad_seqs].split(config.batch_size) if config.grad_seqs else ()
        )
        params = [p for p in model.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            embeddings = model.get_input_embeddings()
            for batch in tqdm(grad_batches, desc="calibration backward", disable=not progress):
                batch = batch.to(device)
                # Gradients w.r.t. activations only: make the embedding output require grad.
                inputs_embeds = embeddings(batch).detach().requires_grad_(True)
                loss = model(inputs_embeds=inputs_embeds, labels=batch).loss
                loss.backward()
                collector.grad_tokens += batch.numel()
        finally:
            for p in params:
                p.requires_grad_(True)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)

    n = collector.tokens
    layers = []
    for layer in range(adapter.num_layers):
        # Free each layer's float64 sum as soon as its float32 statistics exist.
        sum_gg, collector.sum_gg[layer] = collector.sum_gg[layer], None
        grad = None
        if collector.grad_tokens:
            grad = (sum_gg / collector.grad_tokens).float()
        del sum_gg
        layers.append(
            LayerStats(
                mean=(collector.sum_x[layer] / n).float(),
                gram=grams[layer],
                query=(collector.sum_qq[layer] / n).float(),
                grad=grad,
                inputs=torch.cat(collector.samples[layer])
                if collector.samples[layer]
                else torch.empty(0),
            )
        )
    return CalibrationStats(
        layers=layers,
        token_ids=windows[: config.sample_seqs].clone(),
        tokens=n,
        config=config,
        model=model_name,
    )


def calibrate(
    model: nn.Module,
    tokenizer,
    config: CalibrationConfig = CalibrationConfig(),  # noqa: B008
    model_name: str = "model",
    progress: bool = True,
    use_cache: bool = True,
) -> CalibrationStats:
    """Statistics for (model, data, tokens, seed): from the on-disk cache when present."""
    path = cache_path(model, model_name, config)
    if use_cache and path.is_file():
        log.info("calibration statistics reused from %s", path)
        return CalibrationStats.load(path)
    stats = collect(model, tokenizer, config, model_name, progress)
    if use_cache:
        stats.save(path)
        log.info("calibration statistics saved to %s", path)
    return stats
