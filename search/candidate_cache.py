"""Recovered candidates on disk, so that rebuilding one does not train it again.

Stage 2 recovers each candidate through the study's chain (layer-wise fits, then perhaps
distillation). The byte front, `headgroup compare` and `headgroup export` rebuild the winners. The
layer-wise fits come back from their own cache, but distillation would run again: about 5 min
per winner at 2048 tokens on 2 cores, and again on every resumption of a stopped front. This cache
keeps, after the whole chain, the tensors a candidate does not share with the source (its
attention projections). They are stored under `Study.candidate_digest` (model, calibration,
grouping, merge, chain and seed) and the calibration statistics' fingerprint (which follows the
source's weights). A rebuild then costs a merge and a load.

Files are `$HEADGROUP_CACHE/candidates/<key>.pt`. Each is written atomically and is about the
size of the model's attention weights. A file that does not fit the model it is loaded into
(other code, another layout) is ignored, and the candidate is rebuilt.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from torch import nn

from gqa.assets import cache_dir
from gqa.grouping import write_atomic


def _storage(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage().data_ptr()


def _shared(source: nn.Module) -> set[int]:
    """The storages of `source`'s tensors (views of them included)."""
    return {_storage(t) for t in itertools.chain(source.parameters(), source.buffers())}


def _own(model: nn.Module, source: nn.Module) -> dict[str, torch.Tensor]:
    """`model`'s state tensors that share no storage with `source`."""
    shared = _shared(source)
    return {
        key: value
        for key, value in model.state_dict().items()
        if value.numel() and _storage(value) not in shared
    }


class CandidateCache:
    """Recovered candidates' own tensors, one file per candidate digest."""

    def __init__(self, root: Path | None = None):
        self.folder = root or cache_dir() / "candidates"

    def path(self, digest: str) -> Path:
        return self.folder / f"{digest}.pt"

    def load(self, digest: str, model: nn.Module, source: nn.Module) -> bool:
        """Copy the stored tensors into `model` (a fresh converted copy of `source`); False, with
        `model` untouched, when there is no file or it does not fit `model`. A tensor `model`
        shares with `source` is never written, so a mismatch can not change the source."""
        path = self.path(digest)
        if not path.is_file():
            return False
        saved = torch.load(path, map_location="cpu", weights_only=True)
        own = _own(model, source)
        fits = saved.keys() == own.keys() and all(
            own[key].shape == value.shape and own[key].dtype == value.dtype
            for key, value in saved.items()
        )
        if not fits:
            return False
        with torch.no_grad():
            for key, value in saved.items():
                own[key].copy_(value)
        return True

    def store(self, digest: str, model: nn.Module, source: nn.Module) -> Path:
        """Write the tensors of `model` that it does not share with `source`."""
        own = {key: value.detach().cpu() for key, value in _own(model, source).items()}
        path = self.path(digest)
        write_atomic(path, lambda tmp: torch.save(own, tmp))
        return path
