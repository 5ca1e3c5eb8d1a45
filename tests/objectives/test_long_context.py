"""Long-context tasks: held-out splits, prompt construction, position buckets and retrieval
scoring checked against brute force, and greedy decoding agreeing with the teacher-forced score."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import gqa
from gqa.grouping import Grouping
from gqa.precision import PrecisionPlan
from objectives import long_context as lc
from objectives.evaluate import SCORED_TASKS, evaluate, perplexity, token_nlls
from objectives.train_text import evaluation_texts
from tests.tiny import tiny_model

SMALL = lc.LongContextConfig(
    seq_len=96, ppl_windows=2, buckets=(16, 48), lengths=(96, 160), depths=(0.0, 0.5, 1.0), trials=2
)


@pytest.fixture(scope="module")
def model(smol_tokenizer):
    model = tiny_model(
        num_heads=4, num_kv_heads=4, vocab_size=len(smol_tokenizer), max_position_embeddings=2048
    )
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)  # peaked predictions: argmax ties never happen
    return model.eval()


def test_validation_and_test_share_no_document_article_or_needle():
    valid, test = lc.long_documents("valid"), lc.long_documents("test")
    assert len(valid) == lc.LONG_DOC_COUNTS["valid"] and len(test) == lc.LONG_DOC_COUNTS["test"]
    assert not set(valid) & set(test)
    titles = {s: {i.title for i in lc.squad_items(s)} for s in ("valid", "test")}
    assert titles["valid"] and titles["test"] and not titles["valid"] & titles["test"]
    assert lc.NEEDLES["valid"].sentence != lc.NEEDLES["test"].sentence
    assert lc.NEEDLES["valid"].question != lc.NEEDLES["test"].question
    with pytest.raises(ValueError, match="unknown subset 'train'"):
        lc.long_documents("train")


def test_held_out_texts_are_evaluation_texts_for_decontamination():
    seen = set(evaluation_texts())
    assert set(lc.long_documents("test")) <= seen and set(lc.long_documents("valid")) <= seen
    assert {i.background for i in lc.squad_items("test")} <= seen


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="buckets must increase"):
        lc.LongContextConfig(seq_len=128, buckets=(64, 32))
    with pytest.raises(ValueError, match="depths must lie in"):
        lc.LongContextConfig(depths=(1.5,))
    with pytest.raises(ValueError, match="lengths must be >= 64"):
        lc.LongContextConfig(lengths=(10,))


@pytest.mark.parametrize("subset", ["valid", "test"])
def test_passkey_prompts_have_the_length_the_key_at_its_depth(smol_tokenizer, subset):
    prompts = lc.passkey_prompts(smol_tokenizer, subset, SMALL)
    assert len(prompts) == len(SMALL.lengths) * SMALL.trials * len(SMALL.depths)
    needle = lc.NEEDLES[subset]
    for prompt in prompts:
        assert len(prompt.prompt) + len(prompt.answer) == prompt.length
        key = smol_tokenizer.decode(prompt.answer).strip()
        assert len(key) == 5 and key.isdigit()
        assert smol_tokenizer.decode(prompt.prompt).endswith(needle.question)
        sentence = smol_tokenizer(needle.sentence.format(key=key), add_special_tokens=False)
        sentence = tuple(sentence["input_ids"])
        starts = [
            i for i in range(len(prompt.prompt)) if prompt.prompt[i : i + len(sentence)] == sentence
        ]
        question, _ = lc.split_continuation(smol_tokenizer, needle.question, " " + key)
        filler = prompt.length - len(sentence) - len(question) - len(prompt.answer)
        assert starts == [round(prompt.depth * filler)]  # token position = depth of the filler
    other = "test" if subset == "valid" else "valid"
    other_keys = {p.answer for p in lc.passkey_prompts(smol_tokenizer, other, SMALL)}
    assert not other_keys & {p.answer for p in prompts}


def test_mdqa_gold_paragraph_moves_with_depth(smol_tokenizer):
    config = lc.LongContextConfig(lengths=(900,), depths=(0.0, 1.0), trials=2)
    prompts = lc.mdqa_prompts(smol_tokenizer, "test", config)
    assert len(prompts) == 4
    first, last = (smol_tokenizer.decode(p.prompt) for p in prompts[:2])
    assert first.startswith(lc.MDQA_HEADER)
    # Same documents in another order: the gold paragraph first, then last.
    assert sorted(first.split("\n\n")) == sorted(last.split("\n\n"))
    documents = [[b for b in t.split("\n\n") if b.startswith("Document")] for t in (first, last)]
    assert documents[0][0] == documents[1][-1]  # the gold paragraph, first then last
    assert documents[1][-1] + "\n\n" + lc.MDQA_DEMOS + "Question: " in last  # then the demos
    for prompt in prompts:
        assert 900 // 2 < len(prompt.prompt) + len(prompt.answer) <= 900
        assert len(smol_tokenizer.decode(prompt.answer).split()) <= lc.MDQA_MAX_ANSWER_WORDS
    with pytest.raises(ValueError, match="mdqa length 64 holds the paragraph of only 0"):
        lc.mdqa_prompts(smol_tokenizer, "test", lc.LongContextConfig(lengths=(64,)))


def test_long_ppl_buckets_match_brute_force(model, smol_tokenizer):
    result = lc.long_perplexity(model, smol_tokenizer, "test", SMALL, progress=False)
    windows = lc.long_windows(smol_tokenizer, "test", SMALL.seq_len, SMALL.ppl_windows)
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=windows).logits.double(), -1)
    nll = -logp[:, :-1].gather(2, windows[:, 1:, None])[..., 0]  # target positions 1..L-1
    targets = torch.arange(1, SMALL.seq_len)
    for name, lo, hi in (("0-15", 0, 16), ("16-47", 16, 48), ("48-95", 48, 96)):
        expected = math.exp(float(nll[:, (targets >= lo) & (targets < hi)].mean()))
        assert result["buckets"][name] == pytest.approx(expected, rel=1e-4)  # float32 logits
    assert result["score"] == result["buckets"]["48-95"]
    assert result["loss"] == pytest.approx(math.log(result["score"]))
    assert result["perplexity"] == pytest.approx(
        perplexity(model, windows, progress=False).perplexity, rel=1e-6
    )
    assert token_nlls(model, windows, progress=False).shape == (2, SMALL.seq_len - 1)


def test_long_windows_say_when_documents_run_short(smol_tokenizer):
    with pytest.raises(ValueError, match="only .* held-out valid documents have 100000 tokens"):
        lc.long_windows(smol_tokenizer, "valid", 100_000, 1)


def test_retrieval_is_exact_argmax_of_every_answer_token(model, smol_tokenizer):
    prompts = lc.passkey_prompts(smol_tokenizer, "valid", SMALL)[:3]
    # A prompt whose answer is the model's own greedy continuation is retrieved by definition.
    with torch.no_grad():
        greedy = model.generate(
            torch.tensor([prompts[0].prompt]), max_new_tokens=3, do_sample=False, pad_token_id=0
        )[0, len(prompts[0].prompt) :]
    own = lc.RetrievalPrompt(prompts[0].prompt, tuple(greedy.tolist()), 0, 0.0)
    outcomes = lc.score_prompts(model, [*prompts, own], progress=False)
    assert outcomes[-1].correct and outcomes[-1].predicted == own.answer
    for prompt, outcome in zip(prompts, outcomes, strict=False):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt.prompt + prompt.answer])).logits[0]
        n = len(prompt.answer)
        predicted = logits[-n - 1 : -1].argmax(-1)
        assert outcome.correct == bool((predicted == torch.tensor(prompt.answer)).all())
        nll = F.cross_entropy(logits[-n - 1 : -1].double(), torch.tensor(prompt.answer))
        assert outcome.answer_nll == pytest.approx(float(nll), rel=1e-4)


def test_scored_tasks_run_through_evaluate(model, smol_tokenizer):
    assert {"long_ppl", "passkey", "mdqa"} <= set(SCORED_TASKS)
    results = evaluate(
        model,
        smol_tokenizer,
        ["passkey", "long_ppl"],
        subset="valid",
        long_config=SMALL,
        progress=False,
    )
    passkey = results["passkey"]
    assert passkey["n"] == len(passkey["outcomes"]) == 12
    assert passkey["loss"] == passkey["answer_nll"] > 0
    assert set(passkey["by_length"]) == {"96", "160"} and set(passkey["by_depth"]) == {
        "0.0",
        "0.5",
        "1.0",
    }
    assert results["long_ppl"]["seq_len"] == 96
    with pytest.raises(ValueError, match="unknown task.*valid tasks: .*long_ppl.*mdqa.*passkey"):
        evaluate(model, smol_tokenizer, ["needle"])


def _own_prompts(model, prompts, n=3):
    """Half the prompts with the model's own greedy answer (retrieved), half with the key."""
    out = []
    for i, prompt in enumerate(prompts):
        if i % 2:
            out.append(prompt)
            continue
        with torch.no_grad():
            ids = model.generate(
                torch.tensor([prompt.prompt]), max_new_tokens=n, do_sample=False, pad_token_id=0
            )[0, len(prompt.prompt) :]
        out.append(lc.RetrievalPrompt(prompt.prompt, tuple(ids.tolist()), 0, 0.0))
    return out


def test_generation_with_the_real_cache_agrees_with_the_teacher_forced_score(model, smol_tokenizer):
    prompts = lc.passkey_prompts(smol_tokenizer, "test", SMALL)[:4]
    grouped = gqa.converted_copy(model, Grouping.neighbour(4, 2, 2), "mean")
    for candidate in (model, grouped):
        checked = _own_prompts(candidate, prompts)
        outcomes = lc.score_prompts(candidate, checked, progress=False)
        assert any(o.correct for o in outcomes)  # both answers occur: the check can fail
        assert all(lc.generation_agrees(candidate, p, pad_token_id=0) for p in checked)


def test_generation_with_the_quantized_cache_agrees(model, smol_tokenizer):
    prompts = lc.passkey_prompts(smol_tokenizer, "test", SMALL)[:2]
    quantized = gqa.converted_copy(model, Grouping.neighbour(4, 2, 4), "mean")
    gqa.apply_precision(quantized, PrecisionPlan.uniform(2, 4, 4, group_size=8))
    try:
        checked = _own_prompts(quantized, prompts)
        assert all(lc.generation_agrees(quantized, p, pad_token_id=0) for p in checked)
    finally:
        gqa.apply_precision(quantized, None)
