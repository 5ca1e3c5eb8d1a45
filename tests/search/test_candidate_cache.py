"""Recovered candidates kept on disk: a rebuild loads them exactly and does not train again."""

import pytest
import torch

import search.study as study_module
from gqa.grouping import Grouping
from search.candidate_cache import CandidateCache
from search.config import StudyConfig
from search.study import Study
from tests.search.study_fixtures import tiny_study

GROUPING = Grouping.create(6, k=[[[0, 1, 2, 3], [4, 5]]] * 2)


def _study(tmp_path, tokenizer, monkeypatch, distil: bool = True) -> Study:
    path, _ = tiny_study(tmp_path, tokenizer, monkeypatch)
    if distil:
        text = path.read_text().replace(
            'recovery = "layerwise"\nrecovery_config = {layerwise = {steps = 2}}',
            'recovery = ["layerwise", "finetune"]\nrecovery_config = {layerwise = {steps = 2}, '
            "finetune = {tokens = 64, batch_size = 2, seq_len = 16, lr = 1e-2}}",
        )
        assert "finetune" in text
        path.write_text(text)
    return Study(StudyConfig.load(path), progress=False)


def _refuse_training(monkeypatch) -> None:
    def recover(*args, **kwargs):
        pytest.fail("the candidate was trained again")

    monkeypatch.setattr(study_module, "recover", recover)


def _logits(model) -> torch.Tensor:
    ids = torch.arange(3, 27).reshape(2, 12)
    with torch.no_grad():
        return model(ids).logits


def test_a_rebuilt_candidate_loads_its_recovery_instead_of_training(
    tmp_path, smol_tokenizer, monkeypatch
):
    study = _study(tmp_path, smol_tokenizer, monkeypatch)
    source = {k: v.clone() for k, v in study.source.state_dict().items()}
    first = study.build_candidate(GROUPING, progress=False)
    assert len(list(CandidateCache().folder.glob("*.pt"))) == 1
    assert not torch.equal(_logits(first), _logits(study.source))
    with monkeypatch.context() as mp:
        _refuse_training(mp)
        second = study.build_candidate(GROUPING, progress=False)
        assert torch.equal(_logits(first), _logits(second))
        with pytest.raises(pytest.fail.Exception):  # another seed is another candidate
            study.build_candidate(GROUPING, recovery_seed=7, progress=False)
        rungs = []  # stage 2 (on_rung) validates every rung, so it always recovers
        with pytest.raises(pytest.fail.Exception):
            study.build_candidate(GROUPING, progress=False, on_rung=lambda m, a: rungs.append(a))
        assert rungs == ["merge"]
    assert all(torch.equal(v, source[k]) for k, v in study.source.state_dict().items())


def test_a_file_that_does_not_fit_is_rebuilt_and_the_source_is_untouched(
    tmp_path, smol_tokenizer, monkeypatch
):
    study = _study(tmp_path, smol_tokenizer, monkeypatch)
    study.build_candidate(GROUPING, progress=False)
    (path,) = CandidateCache().folder.glob("*.pt")
    # A key of a tensor the candidate shares with the source, shaped to fit: never written.
    name = "model.embed_tokens.weight"
    torch.save({name: torch.zeros_like(study.source.state_dict()[name])}, path)
    source = {k: v.clone() for k, v in study.source.state_dict().items()}
    model = study.build_candidate(GROUPING, progress=False)  # trained again
    assert all(torch.equal(v, source[k]) for k, v in study.source.state_dict().items())
    assert name not in torch.load(path, weights_only=True)  # rebuilt, then stored again
    with monkeypatch.context() as mp:
        _refuse_training(mp)
        assert torch.equal(_logits(model), _logits(study.build_candidate(GROUPING)))


def test_layerwise_fits_alone_keep_no_candidate_file(tmp_path, smol_tokenizer, monkeypatch):
    study = _study(tmp_path, smol_tokenizer, monkeypatch, distil=False)
    study.build_candidate(GROUPING, progress=False)
    assert not CandidateCache().folder.exists()
