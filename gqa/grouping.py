"""The grouping type: per layer, a partition of the query heads into K groups and into V groups.

A group of query heads shares one key (value) head. K and V are partitioned independently, group
sizes may be unequal and the number of groups may differ between layers. Everything is kept in
canonical form (heads sorted inside a group, groups sorted by their smallest head) so that two
groupings that differ only by group labels compare and hash equal.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gqa.precision import kv_bytes_per_token

FORMAT_NAME = "headgroup.grouping"
FORMAT_VERSION = 1

Partition = tuple[tuple[int, ...], ...]


class GroupingError(ValueError):
    """A grouping, or a grouping file, is not valid. The message names the problem."""


def canonical_partition(
    groups: Iterable[Iterable[int]], num_heads: int, where: str = ""
) -> Partition:
    """Validate `groups` as a partition of range(num_heads) and return its canonical form."""
    prefix = f"{where}: " if where else ""
    try:
        groups = [list(g) for g in groups]
    except TypeError as exc:
        raise GroupingError(f"{prefix}groups must be lists of head indices") from exc
    if not groups:
        raise GroupingError(f"{prefix}G = 0: at least one group is needed")
    if len(groups) > num_heads:
        raise GroupingError(
            f"{prefix}{len(groups)} groups for {num_heads} heads: more groups than heads"
        )
    seen: dict[int, int] = {}
    for gi, group in enumerate(groups):
        if not group:
            raise GroupingError(f"{prefix}group {gi} is empty")
        for head in group:
            if isinstance(head, bool) or not isinstance(head, int):
                raise GroupingError(f"{prefix}head {head!r} in group {gi} is not an integer")
            if not 0 <= head < num_heads:
                raise GroupingError(
                    f"{prefix}head {head} in group {gi} is out of range 0..{num_heads - 1}"
                )
            if head in seen:
                raise GroupingError(
                    f"{prefix}not a partition: head {head} is in groups {seen[head]} and {gi}"
                )
            seen[head] = gi
    missing = sorted(set(range(num_heads)) - seen.keys())
    if missing:
        raise GroupingError(f"{prefix}not a partition: heads {missing} are in no group")
    return tuple(sorted(tuple(sorted(g)) for g in groups))


def partition_index(partition: Partition, num_heads: int) -> list[int]:
    """For each query head, the index of the group that holds it."""
    index = [0] * num_heads
    for g, group in enumerate(partition):
        for head in group:
            index[head] = g
    return index


def partition_from_index(index: Sequence[int]) -> Partition:
    """Inverse of `partition_index`: group labels per head -> canonical partition."""
    groups: dict[int, list[int]] = {}
    for head, label in enumerate(index):
        groups.setdefault(int(label), []).append(head)
    return canonical_partition(groups.values(), len(index))


def neighbour_partition(num_heads: int, num_groups: int) -> Partition:
    """Contiguous groups of near-equal size (the first num_heads % G groups get one head more)."""
    if not 1 <= num_groups <= num_heads:
        raise GroupingError(f"cannot split {num_heads} heads into {num_groups} groups")
    base, extra = divmod(num_heads, num_groups)
    groups, start = [], 0
    for g in range(num_groups):
        size = base + (1 if g < extra else 0)
        groups.append(range(start, start + size))
        start += size
    return canonical_partition(groups, num_heads)


@dataclass(frozen=True)
class LayerGrouping:
    """One layer: the K partition and the V partition of its query heads."""

    k: Partition
    v: Partition

    @property
    def num_k_groups(self) -> int:
        return len(self.k)

    @property
    def num_v_groups(self) -> int:
        return len(self.v)

    @property
    def shared(self) -> bool:
        """True when K and V use the same partition."""
        return self.k == self.v


@dataclass(frozen=True)
class Grouping:
    """A whole model's grouping. Build with `Grouping.create` (validates and canonicalises)."""

    num_heads: int
    layers: tuple[LayerGrouping, ...]

    @classmethod
    def create(
        cls,
        num_heads: int,
        k: Sequence[Iterable[Iterable[int]]],
        v: Sequence[Iterable[Iterable[int]]] | None = None,
    ) -> Grouping:
        """Per-layer K partitions (and V partitions; V = K when omitted)."""
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise GroupingError(f"num_heads must be a positive integer, got {num_heads!r}")
        v = k if v is None else v
        if len(k) != len(v):
            raise GroupingError(f"{len(k)} K partitions but {len(v)} V partitions")
        if not k:
            raise GroupingError("a grouping needs at least one layer")
        layers = tuple(
            LayerGrouping(
                canonical_partition(kl, num_heads, f"layer {i} K"),
                canonical_partition(vl, num_heads, f"layer {i} V"),
            )
            for i, (kl, vl) in enumerate(zip(k, v, strict=True))
        )
        return cls(num_heads, layers)

    @classmethod
    def neighbour(
        cls, num_heads: int, num_layers: int, num_groups: int | Sequence[int]
    ) -> Grouping:
        """Contiguous near-equal groups in every layer (G may differ per layer and need not divide H)."""
        counts = [num_groups] * num_layers if isinstance(num_groups, int) else list(num_groups)
        if len(counts) != num_layers:
            raise GroupingError(f"{len(counts)} group counts for {num_layers} layers")
        parts = [neighbour_partition(num_heads, g) for g in counts]
        return cls.create(num_heads, parts)

    @classmethod
    def identity(cls, num_heads: int, num_layers: int) -> Grouping:
        """One group per query head: the MHA layout."""
        return cls.neighbour(num_heads, num_layers, num_heads)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def check_model(self, num_layers: int, num_heads: int) -> None:
        """Raise if this grouping does not fit a model with these sizes."""
        if num_heads != self.num_heads:
            raise GroupingError(
                f"grouping is for {self.num_heads} query heads but the model has {num_heads}"
            )
        if num_layers != self.num_layers:
            raise GroupingError(
                f"wrong number of layers: grouping has {self.num_layers}, the model has {num_layers}"
            )

    def kv_heads(self) -> int:
        """Total number of cached heads, summed over layers, K and V counted separately."""
        return sum(layer.num_k_groups + layer.num_v_groups for layer in self.layers)

    def kv_bytes_per_token(self, head_dim: int, dtype_bytes: int = 2) -> int:
        """KV-cache cost at 16 bits: sum over layers of (G_K + G_V) x head_dim x dtype bytes
        (gqa.precision.kv_bytes_per_token, which also counts a precision plan)."""
        return kv_bytes_per_token(
            [layer.num_k_groups for layer in self.layers],
            [layer.num_v_groups for layer in self.layers],
            head_dim,
            dtype_bytes=dtype_bytes,
        )

    def is_uniform_shared(self) -> bool:
        """Same partition for K and V, equal group sizes, same G in every layer (plain-GQA-able)."""
        first = self.layers[0].k
        size = len(first[0])
        return all(
            layer.shared
            and len(layer.k) == len(first)
            and all(len(group) == size for group in layer.k)
            for layer in self.layers
        )

    # -- JSON ------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "num_heads": self.num_heads,
            "layers": [
                {"k": [list(g) for g in layer.k], "v": [list(g) for g in layer.v]}
                for layer in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, data: object) -> Grouping:
        if not isinstance(data, dict):
            raise GroupingError("bad JSON: a grouping must be a JSON object")
        if data.get("format") != FORMAT_NAME:
            raise GroupingError(f"bad JSON: 'format' must be {FORMAT_NAME!r}")
        if data.get("version") != FORMAT_VERSION:
            raise GroupingError(
                f"bad JSON: unsupported version {data.get('version')!r} (this headgroup reads {FORMAT_VERSION})"
            )
        layers = data.get("layers")
        if not isinstance(layers, list) or not all(
            isinstance(x, dict) and "k" in x and "v" in x for x in layers
        ):
            raise GroupingError(
                "bad JSON: 'layers' must be a list of {'k': [...], 'v': [...]} objects"
            )
        if "num_heads" not in data:
            raise GroupingError("bad JSON: 'num_heads' is missing")
        return cls.create(data["num_heads"], [x["k"] for x in layers], [x["v"] for x in layers])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Grouping:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise GroupingError(
                f"bad JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            ) from exc
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> None:
        """Write the grouping as JSON, atomically."""
        write_text_atomic(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> Grouping:
        path = Path(path)
        if not path.is_file():
            raise GroupingError(f"grouping file {path} does not exist")
        try:
            return cls.from_json(path.read_text())
        except GroupingError as exc:
            raise GroupingError(f"{path}: {exc}") from None


def write_atomic(path: Path, write: Callable[[str], object]) -> None:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it to `path`, so readers
    never see half a file and a stopped writer leaves nothing behind. The file gets the
    permissions a plain write would (mkstemp's are owner-only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` atomically (write_atomic)."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))
