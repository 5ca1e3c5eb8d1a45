"""The `reading` training text: over a million tokens, disjoint from everything evaluated."""

from __future__ import annotations

import pytest

from objectives import train_text
from objectives.data import READING_SPLIT, TextSpec, load_passages, token_windows
from objectives.train_text import evaluation_texts, ngrams, reading_passages


@pytest.fixture(scope="module")
def evaluation_ngrams() -> set[int]:
    seen: set[int] = set()
    for text in evaluation_texts():
        seen |= ngrams(text)
    return seen


def test_reading_text_shares_no_13_gram_with_any_evaluation(evaluation_ngrams):
    passages = reading_passages()
    # (2646 since the long-context tasks hold out 100 Qasper papers and 48 SQuAD articles)
    assert len(passages) > 2500 and len(set(passages)) == len(passages)
    assert all(ngrams(p).isdisjoint(evaluation_ngrams) for p in passages)
    # every evaluated text source is in the set: LAMBADA valid/test and each task's questions
    from objectives.evaluate import TASKS, load_questions

    for task in TASKS:
        question = load_questions(task, limit=1)[0]
        assert ngrams(question.requests[0].context) <= evaluation_ngrams, task
    assert ngrams(load_passages("eval")[0]) <= evaluation_ngrams
    assert ngrams(load_passages("valid")[-1]) <= evaluation_ngrams


def test_reading_split_holds_over_a_million_tokens(smol_tokenizer):
    windows = token_windows(smol_tokenizer, TextSpec(READING_SPLIT, 1024, 1000))
    assert windows.shape == (1000, 1024)  # 1,024,000 tokens, and the stream has more
    assert load_passages(READING_SPLIT) == list(reading_passages())


def test_a_passage_quoting_an_evaluation_is_dropped(monkeypatch, tmp_path):
    """The filter itself: a source passage that quotes a test passage is removed, an unrelated
    one is kept (a fresh build, in an empty cache, against that one evaluation text)."""
    quoted = load_passages("eval")[3]
    clean = " ".join(f"word{i}" for i in range(40))
    monkeypatch.setenv("HEADGROUP_CACHE", str(tmp_path))
    monkeypatch.setattr(
        train_text, "SOURCES", {"fake": lambda: ["Preface. " + quoted[:400] + " Fin.", clean]}
    )
    monkeypatch.setattr(train_text, "evaluation_texts", lambda: iter(["x", quoted]))
    reading_passages.cache_clear()
    try:
        assert reading_passages() == (clean,)
    finally:
        reading_passages.cache_clear()
