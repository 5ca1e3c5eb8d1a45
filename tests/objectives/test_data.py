"""Calibration/train/eval text: disjoint deterministic splits, non-overlapping token windows."""

from __future__ import annotations

import re

import pytest
import torch

from objectives.data import SPLIT_SIZES, SPLITS, TextSpec, load_passages, token_windows


def test_splits_are_disjoint_deterministic_and_sized():
    passages = {split: load_passages(split) for split in SPLIT_SIZES}  # reading: test_train_text
    assert passages == {split: load_passages(split) for split in SPLIT_SIZES}
    for split, size in SPLIT_SIZES.items():
        if size is not None:
            assert len(passages[split]) == size
    assert len(passages["eval"]) == 1551
    assert len(passages["valid"]) == 600
    sets = [set(texts) for texts in passages.values()]
    assert sum(map(len, sets)) == sum(map(len, passages.values()))  # no duplicates inside
    assert len(set.union(*sets)) == sum(map(len, sets))  # and none across splits
    assert all(len(text) > 50 for texts in passages.values() for text in texts)


def test_load_passages_returns_a_copy():
    load_passages("train").clear()
    assert len(load_passages("train")) == 2000


def test_bad_split_name_names_it_and_the_valid_ones():
    with pytest.raises(ValueError, match="'validation'") as error:
        load_passages("validation")
    for split in SPLITS:
        assert split in str(error.value)
    with pytest.raises(ValueError, match="'test'"):
        TextSpec("test", seq_len=16, num_windows=1)


@pytest.mark.parametrize(("seq_len", "num_windows"), [(1, 4), (16, 0)])
def test_text_spec_rejects_degenerate_sizes(seq_len, num_windows):
    with pytest.raises(ValueError):
        TextSpec("eval", seq_len=seq_len, num_windows=num_windows)


def test_windows_cut_the_token_stream_without_overlap(smol_tokenizer):
    spec = TextSpec("calibration", seq_len=64, num_windows=20)
    windows = token_windows(smol_tokenizer, spec)
    assert windows.shape == (20, 64)
    assert windows.dtype == torch.long
    # The windows laid end to end are the start of the tokenized, eos-joined passages.
    passages = load_passages("calibration")[:40]
    stream = smol_tokenizer(smol_tokenizer.eos_token.join(passages), add_special_tokens=False)
    assert len(stream["input_ids"]) > 20 * 64
    assert windows.flatten().tolist() == stream["input_ids"][: 20 * 64]
    assert (windows == smol_tokenizer.eos_token_id).any()


def test_small_request_is_a_prefix_of_a_larger_one(smol_tokenizer):
    small = token_windows(smol_tokenizer, TextSpec("eval", seq_len=32, num_windows=3))
    large = token_windows(smol_tokenizer, TextSpec("eval", seq_len=32, num_windows=300))
    assert torch.equal(small, large[:3])


def test_splits_give_different_windows(smol_tokenizer):
    calibration = token_windows(smol_tokenizer, TextSpec("calibration", 32, 2))
    train = token_windows(smol_tokenizer, TextSpec("train", 32, 2))
    assert not torch.equal(calibration, train)


def test_too_many_windows_says_how_many_are_available(smol_tokenizer):
    with pytest.raises(ValueError, match=r"(\d+) windows of 512 tokens are available") as error:
        token_windows(smol_tokenizer, TextSpec("calibration", seq_len=512, num_windows=10**6))
    available = int(re.search(r"(\d+) windows of 512", str(error.value)).group(1))
    assert available > 0
    windows = token_windows(smol_tokenizer, TextSpec("calibration", 512, available))
    assert windows.shape == (available, 512)
    with pytest.raises(ValueError, match="available"):
        token_windows(smol_tokenizer, TextSpec("calibration", 512, available + 1))


class _CharTokenizer:
    """A tokenizer without an eos token: one id per character."""

    eos_token = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


def test_tokenizer_without_eos_separates_passages_by_a_blank_line():
    windows = token_windows(_CharTokenizer(), TextSpec("eval", seq_len=100, num_windows=30))
    text = "".join(map(chr, windows.flatten().tolist()))
    first, second = load_passages("eval")[:2]
    assert text.startswith(first + "\n\n" + second[:10])
