"""Evaluation: perplexity and multiple-choice scoring checked against brute-force computations."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from objectives.data import TextSpec
from objectives.evaluate import (
    MMLU_LETTERS,
    TASKS,
    Request,
    evaluate,
    evaluate_task,
    load_questions,
    loglikelihoods,
    perplexity,
    question_outcomes,
)


@pytest.fixture(scope="module")
def tiny_model(smol_tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smol_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform predictions; larger logits make the checks discriminating.
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
    return model.eval()


def _token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t = 1..len-1, one position at a time."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
    return torch.stack(
        [F.log_softmax(logits[t - 1].double(), dim=-1)[ids[t]] for t in range(1, len(ids))]
    )


# --- perplexity -------------------------------------------------------------------------------


def test_perplexity_is_exp_of_the_brute_force_mean_nll(tiny_model):
    windows = torch.randint(
        0, tiny_model.config.vocab_size, (5, 9), generator=torch.Generator().manual_seed(1)
    )
    result = perplexity(tiny_model, windows, batch_size=2, progress=False)
    nll = -torch.cat([_token_logprobs(tiny_model, w.tolist()) for w in windows]).mean().item()
    assert result.tokens == 5 * 8
    assert result.nll == pytest.approx(nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(nll), rel=1e-5)
    assert result.nll > 0.5  # not trivially zero: the check above can fail


def test_perplexity_does_not_depend_on_batch_size(tiny_model):
    windows = torch.randint(
        0, tiny_model.config.vocab_size, (7, 12), generator=torch.Generator().manual_seed(2)
    )
    results = [perplexity(tiny_model, windows, batch_size=b, progress=False) for b in (1, 3, 7, 16)]
    for result in results[1:]:
        assert result.tokens == results[0].tokens
        assert result.nll == pytest.approx(results[0].nll, rel=1e-5)


def test_perplexity_restores_training_mode(tiny_model):
    tiny_model.train()
    try:
        perplexity(tiny_model, torch.zeros(1, 4, dtype=torch.long), progress=False)
        assert tiny_model.training
    finally:
        tiny_model.eval()


# --- multiple-choice scoring ------------------------------------------------------------------


def _brute_force_loglikelihood(model, tokenizer, request: Request) -> float:
    context = tokenizer(request.context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(request.context + request.continuation, add_special_tokens=False)["input_ids"]
    assert whole[: len(context)] == context
    return _token_logprobs(model, whole)[len(context) - 1 :].sum().item()


REQUESTS = [
    Request("Question: Which gas do plants absorb?\nAnswer:", " carbon dioxide"),
    Request("The cat sat on the", " mat."),
    Request("Goal: open a jar.\nAnswer:", " Twist the lid counter-clockwise until it comes off."),
    Request("Hello", " world"),
]


def test_continuation_logprob_matches_brute_force(tiny_model, smol_tokenizer):
    scores = loglikelihoods(tiny_model, smol_tokenizer, REQUESTS, batch_size=4, progress=False)
    for request, score in zip(REQUESTS, scores, strict=True):
        expected = _brute_force_loglikelihood(tiny_model, smol_tokenizer, request)
        assert score == pytest.approx(expected, rel=1e-4, abs=1e-4)
        assert score < 0


def test_padding_and_sorting_do_not_change_scores(tiny_model, smol_tokenizer):
    one_by_one = loglikelihoods(tiny_model, smol_tokenizer, REQUESTS, batch_size=1, progress=False)
    batched = loglikelihoods(tiny_model, smol_tokenizer, REQUESTS, batch_size=3, progress=False)
    assert batched == pytest.approx(one_by_one, rel=1e-4, abs=1e-4)


def test_trailing_context_whitespace_moves_to_the_continuation(tiny_model, smol_tokenizer):
    moved, plain = loglikelihoods(
        tiny_model,
        smol_tokenizer,
        [Request("The cat sat on the ", "mat."), Request("The cat sat on the", " mat.")],
        progress=False,
    )
    assert moved == pytest.approx(plain, rel=1e-5)


def test_long_requests_are_truncated_from_the_left(tiny_model, smol_tokenizer):
    request = REQUESTS[2]
    whole = smol_tokenizer(request.context + request.continuation, add_special_tokens=False)[
        "input_ids"
    ]
    context_len = len(smol_tokenizer(request.context, add_special_tokens=False)["input_ids"])
    max_length = len(whole) - 3  # drops the first 2 context tokens
    (score,) = loglikelihoods(
        tiny_model, smol_tokenizer, [request], max_length=max_length, progress=False
    )
    kept = whole[2:]
    expected = _token_logprobs(tiny_model, kept)[context_len - 3 :].sum().item()
    assert score == pytest.approx(expected, rel=1e-4)


# --- tasks ------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["arc_easy", "piqa"])
def test_evaluate_task_reports_accuracy_on_limit_questions(tiny_model, smol_tokenizer, task):
    result = evaluate_task(tiny_model, smol_tokenizer, task, limit=6, batch_size=8, progress=False)
    assert result.task == task
    assert result.n == 6
    assert 0.0 <= result.acc <= 1.0
    assert 0.0 <= result.acc_norm <= 1.0
    assert (result.acc * 6).is_integer()
    # the accuracy is the share of the per-question outcomes (what paired intervals resample)
    correct, correct_norm = question_outcomes(
        tiny_model, smol_tokenizer, task, limit=6, batch_size=8, progress=False
    )
    assert len(correct) == len(correct_norm) == 6
    assert result.acc == sum(correct) / 6 and result.acc_norm == sum(correct_norm) / 6


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_loads_complete_questions(task):
    questions = load_questions(task, limit=3)
    assert len(questions) == 3
    for question in questions:
        assert len(question.requests) >= 2
        assert 0 <= question.gold < len(question.requests)
        assert all(r.context and r.continuation.startswith(" ") for r in question.requests)
    assert load_questions(task, limit=3) == questions


def test_rc_tasks_keep_file_order_and_choice_order():
    (first,) = load_questions("arc_easy", limit=1)
    assert first.doc_id == "0"
    assert first.requests[0].continuation == " cellular telephone"
    assert first.gold == 0


def test_mmlu_formats_four_lettered_choices_over_many_subjects():
    questions = load_questions("mmlu", limit=57)
    assert len(questions) == 57
    assert len({q.doc_id.split("/")[0] for q in questions}) == 57
    first = questions[0]
    assert first.doc_id == "abstract_algebra/0"
    assert [r.continuation for r in first.requests] == [f" {letter}" for letter in MMLU_LETTERS]
    context = first.requests[0].context
    assert context.startswith("Question: Find the degree for the given field extension")
    assert context.endswith("\nA. 0\nB. 4\nC. 2\nD. 6\nAnswer:")
    assert first.gold == 1


def test_unknown_task_names_it_and_lists_the_valid_ones(tiny_model, smol_tokenizer):
    with pytest.raises(ValueError, match="'winogrande'") as error:
        evaluate_task(tiny_model, smol_tokenizer, "winogrande", limit=1, progress=False)
    assert "arc_easy" in str(error.value) and "mmlu" in str(error.value)


def test_evaluate_checks_all_names_before_running_anything():
    # The model is None: touching it would raise something other than this ValueError.
    with pytest.raises(ValueError, match="'nope'") as error:
        evaluate(None, None, ["ppl", "arc_easy", "nope"], limit=1)
    assert "ppl" in str(error.value)


def test_evaluate_returns_json_able_results(tiny_model, smol_tokenizer):
    spec = TextSpec("eval", seq_len=16, num_windows=3)
    results = evaluate(
        tiny_model, smol_tokenizer, ["ppl", "boolq"], limit=2, ppl_spec=spec, progress=False
    )
    assert set(results) == {"ppl", "boolq"}
    assert results["ppl"]["tokens"] == 3 * 15
    assert results["ppl"]["perplexity"] == pytest.approx(math.exp(results["ppl"]["nll"]))
    assert results["boolq"]["n"] == 2
    assert json.loads(json.dumps(results)) == results


@pytest.mark.parametrize("task", ["arc_easy", "hellaswag", "piqa"])
def test_valid_and_test_questions_are_disjoint_and_cover_the_task(task):
    every = load_questions(task, limit=60)
    valid = load_questions(task, limit=12, subset="valid")
    test = load_questions(task, limit=48, subset="test")
    valid_ids = {q.doc_id for q in valid}
    test_ids = {q.doc_id for q in test}
    assert len(valid_ids) == 12 and len(test_ids) == 48
    assert not valid_ids & test_ids
    assert valid_ids | test_ids == {q.doc_id for q in every}
    assert load_questions(task, limit=5, subset="test") == test[:5]  # a prefix, like `limit`


def test_unknown_subset_is_named():
    with pytest.raises(ValueError, match="unknown question subset 'dev'"):
        load_questions("arc_easy", limit=3, subset="dev")
