"""What the benchmark scripts share: a study on a throwaway storage, saved groupings, token
windows of a split, and CSV rows that a stopped run resumes from.

Paths are relative to the repository root, where the scripts run: the studies' configs in
experiments/configs, their saved groupings in results/<study>/groupings, and the results in
results/bench.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

import gqa
from gqa.grouping import Grouping, write_text_atomic
from gqa.models import LoadedModel, load_model
from objectives.calibration import CalibrationConfig, CalibrationStats, calibrate
from objectives.data import READING_SPLIT, TEST_SPLIT, TextSpec, token_windows
from objectives.evaluate import evaluate
from objectives.recovery import FinetuneConfig
from search.config import StudyConfig
from search.study import Study

RESULTS = Path("results/bench")
DEFAULT_CONFIG = Path("experiments/configs/default.toml")
DEMO_CONFIG = Path("experiments/configs/demo.toml")
DEFAULT_GROUPINGS = Path("results/default/groupings")  # the default study's saved groupings


@contextmanager
def throwaway_study(
    config: StudyConfig | Path, progress: bool = False, **changes
) -> Iterator[Study]:
    """A `Study` of `config` (a loaded config or a TOML path; fields replaced by `changes`) whose
    storage is a temporary SQLite file, deleted on exit: for benchmarks that use the study's
    model, calibration, merge and recovery but neither read nor write its results."""
    if not isinstance(config, StudyConfig):
        config = StudyConfig.load(config)
    with tempfile.TemporaryDirectory() as tmp:
        config = dataclasses.replace(config, storage=f"sqlite:///{tmp}/unused.db", **changes)
        yield Study(config, progress=progress)


def saved_grouping(pattern: str) -> Grouping:
    """The one grouping file that `pattern` (a glob such as
    "results/default/groupings/2kv_coarsen_source_*.json") matches."""
    files = sorted(Path().glob(pattern))
    if len(files) != 1:
        raise SystemExit(f"expected one grouping {pattern}, found {len(files)}")
    return Grouping.load(files[0])


def split_windows(tokenizer, count: int, split: str = TEST_SPLIT, seq_len: int = 256):
    """`count` token windows of `seq_len` tokens of a split (objectives.data), (count, seq_len)."""
    return token_windows(tokenizer, TextSpec(split, seq_len, count))


def calibrated(model: str = "smollm2-135m", **calibration) -> tuple[LoadedModel, CalibrationStats]:
    """A registered model and its calibration statistics (CalibrationConfig fields as keywords)."""
    loaded = load_model(model)
    config = CalibrationConfig(**calibration)
    return loaded, calibrate(loaded.model, loaded.tokenizer, config, model)


def parsed_specs(parser, option: str, text: str, parse, noun: str) -> dict:
    """{spec: parse(spec)} for the comma-separated specs an option gave; a bad spec (`parse`
    raises a ValueError naming it) or none at all is a one-line usage error (exit 2)."""
    try:
        specs = {spec: parse(spec) for spec in text.split(",") if spec}
    except ValueError as error:
        parser.error(f"{option}: {error}")
    if not specs:
        parser.error(f"{option}: no {noun} given")
    return specs


class CsvRows:
    """The rows of a benchmark's CSV file: those of an earlier run when the file exists (a stopped
    run resumes), and the file rewritten atomically (gqa.grouping.write_text_atomic) on `append`
    and `write`, so that it always holds whole rows."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows: list[dict] = (
            pd.read_csv(self.path).to_dict("records") if self.path.is_file() else []
        )

    def append(self, row: dict) -> None:
        self.rows.append(row)
        self.write()

    def write(self) -> None:
        write_text_atomic(self.path, self.frame().to_csv(index=False))

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)


def distill_recipe(tokens: int, batch_size: int, seq_len: int, **changes) -> FinetuneConfig:
    """The benchmarks' fine-tuning recipe: `tokens` of the `reading` text in batches of
    `batch_size` x `seq_len`, distilled from the source, Q/K/V/O trained, lr 1e-4 with cosine
    decay after a 5% warm-up; `changes` replace other FinetuneConfig fields."""
    steps = max(1, tokens // (batch_size * seq_len))
    return FinetuneConfig(
        tokens=tokens,
        lr=1e-4,
        lr_scheduler="cosine",
        warmup_steps=max(1, steps // 20),
        batch_size=batch_size,
        seq_len=seq_len,
        text=READING_SPLIT,
        distill=True,
        trainable=("q", "k", "v", "o"),
        **changes,
    )


def long_task_fields(model, plan, tokenizer, task: str, long_config) -> dict:
    """One scored task (long_ppl, passkey, mdqa) on test data, `model` run under the precision
    `plan` (None: 16 bits): the CSV fields the long-context benchmarks share, its per-document
    losses or per-prompt outcomes kept (JSON) for paired intervals."""
    with gqa.precision_applied(model, plan):
        result = evaluate(
            model, tokenizer, [task], subset="test", long_config=long_config, progress=False
        )[task]
    detail = {k: result[k] for k in ("buckets", "by_length", "by_depth") if k in result}
    return {
        "score": result["score"],
        "loss": result["loss"],
        "detail": json.dumps(detail),
        "outcomes": json.dumps(result.get("outcomes") or result.get("window_loss")),
    }
