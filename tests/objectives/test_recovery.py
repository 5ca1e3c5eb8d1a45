"""Recovery after conversion (layerwise local fit, Trainer fine-tuning) on a tiny random model."""

import copy
import importlib

import pytest
import torch
from torch import nn

import gqa
from gqa.adapters import get_adapter
from gqa.grouping import Grouping
from objectives.calibration import CalibrationConfig, calibrate
from objectives.proxies import make_proxy
from objectives.recovery import (
    FinetuneConfig,
    LayerwiseConfig,
    RecoveryDivergedError,
    recover,
)
from tests.tiny import tiny_model

CONFIG = CalibrationConfig(seq_len=16, num_seqs=6, grad_seqs=2, sample_seqs=6, batch_size=3)
MERGED = Grouping.neighbour(6, 2, 1)  # one K and one V head per layer (the source has 3)
TINY_FINETUNE = dict(
    max_steps=3, batch_size=2, seq_len=16, num_train_windows=6, lr=1e-3, device="cpu"
)


@pytest.fixture(scope="module")
def model():
    return tiny_model(num_kv_heads=3, vocab_size=49152)


@pytest.fixture(scope="module")
def stats(model, smol_tokenizer, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HEADGROUP_CACHE", str(tmp_path_factory.mktemp("cache")))
        return calibrate(model, smol_tokenizer, CONFIG, model_name="tiny", progress=False)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _changed(before: dict[str, torch.Tensor], model: nn.Module) -> set[str]:
    after = model.state_dict()
    assert set(after) == set(before)
    return {name for name, t in before.items() if not torch.equal(t, after[name])}


def _projection_names(model: nn.Module, which: tuple[str, ...]) -> set[str]:
    return {
        name
        for name, _ in model.named_parameters()
        if any(f".self_attn.{w}_proj." in name for w in which)
    }


def _assert_grouping_and_cache(model: nn.Module, grouping: Grouping) -> None:
    assert gqa.model_grouping(model) == grouping
    ids = torch.tensor([[5, 17, 230, 9]])
    out = model.generate(
        input_ids=ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True
    )
    assert out.sequences.shape == (1, 7)
    for layer, lg in zip(gqa.output_cache(out).layers, grouping.layers, strict=True):
        assert layer.keys.shape[1] == lg.num_k_groups
        assert layer.values.shape[1] == lg.num_v_groups


def _counted_fits(monkeypatch) -> list:
    """A list that gets an item each time a layer is fitted (not read from the cache)."""
    layerwise_module = importlib.import_module("objectives.recovery.layerwise")
    calls = []
    real_fit = layerwise_module.fit_layer
    monkeypatch.setattr(
        layerwise_module, "fit_layer", lambda *a, **k: calls.append(1) or real_fit(*a, **k)
    )
    return calls


# -- layerwise ---------------------------------------------------------------------------------


def test_layerwise_reduces_each_layers_local_error(model, stats, smol_tokenizer):
    source_before = _state(model)
    converted = gqa.convert(copy.deepcopy(model), MERGED)
    before = _state(converted)
    # holdout=0: the error is measured on the fitted sequences (a tiny random model overfits
    # 16-token sequences, so held-out errors barely move; see the never-worse tests below).
    config = LayerwiseConfig(steps=20, lr=2e-2, batch_size=3, holdout=0.0, cache=False)
    result = recover("layerwise", converted, model, smol_tokenizer, stats, config, progress=False)

    assert result.method == "layerwise" and result.steps == 40 and len(result.history) == 40
    assert len(result.layer_losses) == 2
    for initial, final in result.layer_losses:
        assert final < 0.8 * initial
    # The initial loss is the local_attn proxy's score of the grouping.
    proxy = make_proxy("local_attn", model, stats)
    assert result.initial_loss == pytest.approx(proxy.score(MERGED), rel=1e-4)
    assert result.final_loss == pytest.approx(sum(f for _, f in result.layer_losses))

    trained = _projection_names(converted, ("k", "v"))
    assert _changed(before, converted) == trained  # everything else is bitwise unchanged
    assert result.trainable_parameters == sum(
        p.numel() for n, p in converted.named_parameters() if n in trained
    )
    assert all(p.requires_grad for p in converted.parameters())
    assert not _changed(source_before, model)
    _assert_grouping_and_cache(converted, MERGED)


def test_layerwise_can_train_q_and_o(model, stats):
    converted = gqa.convert(copy.deepcopy(model), MERGED)
    before = _state(converted)
    config = LayerwiseConfig(steps=2, batch_size=3, train=("q", "o"))
    recover("layerwise", converted, model, None, stats, config, progress=False)
    assert _changed(before, converted) == _projection_names(converted, ("q", "o"))


def test_layerwise_identity_grouping_stays_exact(model, stats):
    identity = Grouping.identity(6, 2)
    converted = gqa.convert(copy.deepcopy(model), identity)
    before = _state(converted)
    result = recover(
        "layerwise", converted, model, None, stats, {"steps": 5, "lr": 1e-2}, progress=False
    )
    assert result.initial_loss == pytest.approx(0.0, abs=1e-10)
    assert result.final_loss == result.initial_loss and result.steps == 0
    assert not _changed(before, converted)  # an exact layer is not trained at all


def test_layerwise_never_ends_worse_than_it_started(model, stats):
    """A learning rate that wrecks the fit: layers end no worse than they started (held-out), and
    a layer that found nothing better keeps its starting weights bit for bit."""
    converted = gqa.convert(copy.deepcopy(model), MERGED)
    before = _state(converted)
    config = LayerwiseConfig(steps=6, lr=5.0, batch_size=3, check_every=2, cache=False)
    result = recover("layerwise", converted, model, None, stats, config, progress=False)
    kept = [layer for layer, (i, f) in enumerate(result.layer_losses) if f == i]
    assert all(f <= i for i, f in result.layer_losses)
    assert kept, "lr=5 should leave at least one layer at its start"
    changed = _changed(before, converted)
    for layer in kept:
        assert not {n for n in changed if f"layers.{layer}." in n}


def test_layerwise_fits_are_cached_per_layer(model, stats, tmp_path, monkeypatch):
    monkeypatch.setenv("HEADGROUP_CACHE", str(tmp_path))
    config = LayerwiseConfig(steps=4, lr=1e-2, batch_size=3, check_every=2)
    first = gqa.convert(copy.deepcopy(model), MERGED)
    r1 = recover("layerwise", first, model, None, stats, config, progress=False, merge="mean")
    assert r1.steps == 8
    calls = _counted_fits(monkeypatch)
    second = gqa.convert(copy.deepcopy(model), MERGED)
    r2 = recover("layerwise", second, model, None, stats, config, progress=False, merge="mean")
    assert calls == []  # a second run fits nothing
    assert r2.layer_losses == r1.layer_losses
    for (n1, p1), (n2, p2) in zip(first.named_parameters(), second.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    # Another seed is another fit.
    third = gqa.convert(copy.deepcopy(model), MERGED)
    recover(
        "layerwise",
        third,
        model,
        None,
        stats,
        {**vars(config), "seed": 1},
        progress=False,
        merge="mean",
    )
    assert len(calls) == 2


def test_layerwise_with_a_precision_plan_fits_through_the_quantized_cache(
    model, stats, tmp_path, monkeypatch
):
    """Recovery aware of precision: with a 2-bit cache simulated in the attention (straight-
    through), each layer's error is measured and reduced as the layer will run, and the fits are
    cached apart from the 16-bit ones. (Whether that beats fitting at 16 bits and quantizing
    afterwards is measured on SmolLM2 in experiments/benchmarks/bench_precision_recovery.py.)"""
    monkeypatch.setenv("HEADGROUP_CACHE", str(tmp_path))
    plan = gqa.PrecisionPlan.uniform(2, 2, group_size=4)
    config = LayerwiseConfig(steps=30, lr=2e-2, batch_size=3, holdout=0.0)
    plain = gqa.convert(copy.deepcopy(model), MERGED)
    exact = recover("layerwise", plain, model, None, stats, config, progress=False, merge="mean")
    aware = gqa.apply_precision(gqa.convert(copy.deepcopy(model), MERGED), plan)
    before = _state(aware)
    result = recover("layerwise", aware, model, None, stats, config, progress=False, merge="mean")
    assert gqa.model_precision(aware) == plan  # recovery keeps the plan
    assert _changed(before, aware) == _projection_names(aware, ("k", "v"))
    for (initial, final), (exact_initial, _) in zip(
        result.layer_losses, exact.layer_losses, strict=True
    ):
        assert initial > exact_initial  # the merged layer's error includes the 2-bit cache's
        assert final < initial
    folders = sorted(p.name for p in (tmp_path / "layer_fits").iterdir())
    assert len(folders) == 2  # 16-bit fits and 2-bit fits, keyed apart


# -- finetune ----------------------------------------------------------------------------------


def test_finetune_trains_only_the_chosen_projections(model, smol_tokenizer):
    converted = gqa.convert(copy.deepcopy(model), MERGED)
    before = _state(converted)
    config = FinetuneConfig(**TINY_FINETUNE, logging_steps=1)
    result = recover("finetune", converted, model, smol_tokenizer, None, config, progress=False)

    assert result.method == "finetune" and result.steps == 3 and len(result.history) == 3
    assert result.initial_loss == result.history[0] and result.final_loss == result.history[-1]
    assert _changed(before, converted) == _projection_names(converted, ("k", "v"))
    assert torch.equal(
        before["model.embed_tokens.weight"], converted.model.embed_tokens.weight
    )  # a frozen parameter
    assert all(p.requires_grad for p in converted.parameters())
    assert not converted.training and converted.config.use_cache
    _assert_grouping_and_cache(converted, MERGED)


def test_finetune_distillation_adds_the_kl_to_the_loss(model, smol_tokenizer):
    source_before = _state(model)
    losses = {}
    for distill in (False, True):
        converted = gqa.convert(copy.deepcopy(model), MERGED)
        config = FinetuneConfig(**{**TINY_FINETUNE, "max_steps": 1}, distill=distill)
        result = recover("finetune", converted, model, smol_tokenizer, None, config, progress=False)
        losses[distill] = result.initial_loss
    assert losses[True] > losses[False]  # same batch and weights; KL(source || converted) > 0
    assert not _changed(source_before, model) and not model.training
    assert all(p.requires_grad for p in model.parameters())


def test_finetune_lora_is_merged_back(model, smol_tokenizer):
    converted = gqa.convert(copy.deepcopy(model), MERGED)
    cls, before = type(converted), _state(converted)
    config = FinetuneConfig(**TINY_FINETUNE, lora=True, lora_r=4)
    result = recover("finetune", converted, model, smol_tokenizer, None, config, progress=False)

    assert type(converted) is cls
    assert not any("lora" in name for name in converted.state_dict())
    adapter = get_adapter(converted)
    assert all(
        type(adapter.projection(i, w)) is nn.Linear for i in range(2) for w in ("q", "k", "v", "o")
    )
    assert _changed(before, converted) == _projection_names(converted, ("k", "v"))
    # LoRA factors (r x in) and (out x r) for k and v (8 outputs each: one head) in 2 layers.
    assert result.trainable_parameters == 2 * 2 * 4 * (48 + 8)
    _assert_grouping_and_cache(converted, MERGED)


def test_finetune_by_token_budget_on_the_reading_text(model, smol_tokenizer, monkeypatch):
    """tokens = N sets the steps (N / (batch x seq_len), rounded up) and reads one pass of
    windows from the chosen text; the schedule is the one asked for."""
    from transformers import Trainer

    seen = {}
    real_train = Trainer.train

    def spy(self, *args, **kwargs):
        seen["windows"] = len(self.train_dataset)
        seen["scheduler"] = self.args.lr_scheduler_type
        return real_train(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", spy)
    converted = gqa.convert(copy.deepcopy(model), MERGED)
    settings = {**TINY_FINETUNE, "num_train_windows": 2}
    config = FinetuneConfig(**settings, tokens=130, text="reading", lr_scheduler="cosine")
    assert config.steps == 5  # ceil(130 / 32)
    result = recover("finetune", converted, model, smol_tokenizer, None, config, progress=False)
    assert result.steps == 5 and len(result.history) == 5
    assert seen == {"windows": 10, "scheduler": "cosine"}


def test_a_stopped_finetune_resumes_to_the_same_weights(
    model, smol_tokenizer, tmp_path, monkeypatch
):
    """Checkpoints every 2 steps; a run killed after step 3 resumes from step 2 and ends with
    the weights of an unstopped run. A folder of another run is refused."""
    module = importlib.import_module("objectives.recovery.finetune")

    settings = {**TINY_FINETUNE, "max_steps": 5, "save_steps": 2}
    unstopped = gqa.convert(copy.deepcopy(model), MERGED)
    recover("finetune", unstopped, model, smol_tokenizer, None, FinetuneConfig(**settings))

    config = FinetuneConfig(**settings, checkpoint_dir=str(tmp_path / "ckpt"))
    stopped = gqa.convert(copy.deepcopy(model), MERGED)
    start = _state(stopped)
    real = module._make_trainer_class

    def killed_after_step_3():
        cls = real()

        class Killed(cls):
            def training_step(self, *args, **kwargs):
                if self.state.global_step == 3:
                    raise KeyboardInterrupt("stopped")
                return super().training_step(*args, **kwargs)

        return Killed

    with monkeypatch.context() as patch:
        patch.setattr(module, "_make_trainer_class", killed_after_step_3)
        with pytest.raises(KeyboardInterrupt):
            recover("finetune", stopped, model, smol_tokenizer, None, config, progress=False)
    assert not _changed(start, stopped)  # the failed call left the model as it was
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("checkpoint-*")) == ["checkpoint-2"]

    result = recover("finetune", stopped, model, smol_tokenizer, None, config, progress=False)
    assert result.steps == 5 and len(result.history) == 3  # steps 3, 4, 5
    final = _state(unstopped)
    for name, tensor in _state(stopped).items():
        torch.testing.assert_close(tensor, final[name], rtol=1e-5, atol=1e-6, msg=name)

    other = gqa.convert(copy.deepcopy(model), Grouping.neighbour(6, 2, 2))
    with pytest.raises(ValueError, match="holds checkpoints of another run"):
        recover("finetune", other, model, smol_tokenizer, None, config, progress=False)


# -- divergence and errors ---------------------------------------------------------------------


@pytest.mark.parametrize("lora", [False, True])
def test_finetune_divergence_stops_with_a_clear_error(model, smol_tokenizer, lora):
    converted = gqa.convert(copy.deepcopy(model), MERGED)
    cls, before = type(converted), _state(converted)
    config = FinetuneConfig(**{**TINY_FINETUNE, "max_steps": 5}, lora=lora)
    # From the second forward on, the logits are NaN (a huge learning rate no longer reliably
    # overflows: gradient clipping and a saturated softmax keep the loss finite).
    calls = []
    poison = converted.lm_head.register_forward_hook(
        lambda module, args, out: calls.append(1) or (out * float("nan") if len(calls) > 1 else out)
    )
    try:
        with pytest.raises(RecoveryDivergedError, match=r"finetune step 2: .*lower learning rate"):
            recover("finetune", converted, model, smol_tokenizer, None, config, progress=False)
    finally:
        poison.remove()
    assert type(converted) is cls and not _changed(before, converted)  # restored, no adapters
    assert all(p.requires_grad for p in converted.parameters())


def test_layerwise_divergence_stops_with_a_clear_error(model, stats, monkeypatch):
    from gqa.adapters import ModelAdapter

    real_attend = ModelAdapter.attend

    def exploding(self, module, x):  # NaN while training; error checks run without gradients
        if not torch.is_grad_enabled():
            return real_attend(self, module, x)
        return torch.full(x.shape, float("nan"), requires_grad=True)

    converted = gqa.convert(copy.deepcopy(model), MERGED)
    before = _state(converted)
    monkeypatch.setattr(ModelAdapter, "attend", exploding)
    with pytest.raises(RecoveryDivergedError, match="layerwise layer 0 step 1: .*lower learning"):
        recover("layerwise", converted, model, None, stats, {"steps": 2}, progress=False)
    assert not _changed(before, converted)


def test_unknown_method_names_it_and_lists_the_methods(model):
    with pytest.raises(
        ValueError, match=r"unknown recovery method 'nope' \(available: finetune, layerwise\)"
    ):
        recover("nope", model, model)


def test_bad_configs(model):
    with pytest.raises(ValueError, match="layerwise train must be a non-empty subset"):
        LayerwiseConfig(train=("k", "x"))
    with pytest.raises(ValueError, match="finetune trainable must be 'all'"):
        FinetuneConfig(trainable="kv")
    with pytest.raises(ValueError, match="lr_scheduler must be one of linear, cosine, constant"):
        FinetuneConfig(lr_scheduler="cosine_with_restarts")
    with pytest.raises(ValueError, match="finetune text must be one of train, reading"):
        FinetuneConfig(text="eval")  # never train on test text
    with pytest.raises(ValueError, match="finetune tokens must be >= 0"):
        FinetuneConfig(tokens=-5)
    with pytest.raises(TypeError, match="recovery 'layerwise' takes a LayerwiseConfig"):
        recover("layerwise", copy.deepcopy(model), model, config=FinetuneConfig())


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2: V has a bias, solved with it
def test_v_solve_reaches_the_least_squares_optimum(family):
    """With queries and keys fixed the output is affine in V: conjugate gradients must reach the
    optimum of an explicit least-squares solve over V's parameters (the map built column by
    column), never increasing the loss on the way."""
    from objectives.recovery.layerwise import solve_values, source_outputs

    source = tiny_model(family, num_kv_heads=3)
    converted = gqa.convert(copy.deepcopy(source), MERGED, merge="mean")
    a, s = get_adapter(converted), get_adapter(source)
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(6, 16, source.config.hidden_size, generator=gen)
    target = source_outputs(s, 0, inputs, batch_size=3)
    module = a.attention(0)
    values = list(a.module_projection(module, "v").parameters())
    norm = float(target.pow(2).sum())

    with torch.no_grad():  # the explicit affine map: y(V0 + w) = y(V0) + L w
        start = [v.detach().clone() for v in values]
        base = a.attend(module, inputs).reshape(-1)
        columns = []
        for v in values:
            flat = v.view(-1)
            for i in range(flat.numel()):
                flat[i] += 1.0
                columns.append(a.attend(module, inputs).reshape(-1) - base)
                flat[i] -= 1.0
        lin = torch.stack(columns, 1).double()
        w = torch.linalg.lstsq(lin, (target.reshape(-1) - base).double()[:, None]).solution
        optimum = float((lin @ w)[:, 0].sub((target.reshape(-1) - base).double()).pow(2).sum())
    optimum /= norm

    config = LayerwiseConfig(v_solve=80, batch_size=3)
    losses = solve_values(module, a, inputs, target, values, config)
    with torch.no_grad():
        final = float((a.attend(module, inputs) - target).pow(2).sum()) / norm
    assert all(
        later <= earlier * (1 + 1e-5) for earlier, later in zip(losses, losses[1:], strict=False)
    )
    assert losses[0] > 1.1 * optimum  # the merge is not the optimum: the solve has work to do
    assert final == pytest.approx(optimum, rel=1e-3)
    assert not all(torch.equal(v, s0) for v, s0 in zip(values, start, strict=True))


def test_v_solve_in_layerwise_recovery_keeps_the_best_and_is_keyed_apart(model, stats):
    """Inside a layer-wise fit the solve is checked on the held-out sequences like an Adam step
    (a layer never ends worse than it started), and its fits are cached apart from others."""
    from objectives.recovery.layerwise import LayerFitCache

    converted = gqa.convert(copy.deepcopy(model), MERGED, merge="mean")
    config = LayerwiseConfig(steps=5, lr=1e-2, train=("v",), v_solve=20)
    result = recover("layerwise", converted, model, None, stats, config, progress=False)
    assert len(result.layer_losses) == 2
    assert all(final <= initial for initial, final in result.layer_losses)
    assert len(result.history) > result.steps  # the solve's steps are in the history too
    # Measured on the fitted sequences themselves (holdout 0), the solve must show: Adam's one
    # step at a negligible rate cannot account for the drop.
    converted = gqa.convert(copy.deepcopy(model), MERGED, merge="mean")
    config = LayerwiseConfig(steps=1, lr=1e-9, train=("v",), v_solve=20, holdout=0.0)
    solved_fit = recover("layerwise", converted, model, None, stats, config, progress=False)
    assert all(final < 0.99 * initial for initial, final in solved_fit.layer_losses)
    plain, solved = (LayerFitCache(stats, "mean", LayerwiseConfig(v_solve=n)) for n in (0, 20))
    assert plain.folder != solved.folder
    assert "v_solve" not in LayerwiseConfig().fit_key()  # fits cached before it stay valid


def test_v_solve_needs_v_trained():
    with pytest.raises(ValueError, match="v_solve needs 'v' in train"):
        LayerwiseConfig(train=("k",), v_solve=3)
    with pytest.raises(ValueError, match="v_solve must be an integer >= 0, got -1"):
        LayerwiseConfig(v_solve=-1)


# -- latent layers -----------------------------------------------------------------------------


def _latent(model, stats, ranks=(8, 8)):
    from gqa.latent import LatentPlan
    from gqa.latent_model import apply_latent

    plan = LatentPlan.uniform(2, *ranks)
    return apply_latent(copy.deepcopy(model), plan, [layer.gram for layer in stats.layers])


def test_layerwise_fits_latent_layers_and_keys_their_fits_apart(
    model, stats, tmp_path, monkeypatch
):
    """Layer-wise recovery trains the latent factors (down and up of K, V's down and the folded
    o_proj) like merged projections, and caches their fits apart from a grouping's."""
    monkeypatch.setenv("HEADGROUP_CACHE", str(tmp_path))
    # holdout=0 as above: a tiny random model overfits 16-token sequences
    config = LayerwiseConfig(steps=20, lr=2e-2, batch_size=3, holdout=0.0, train=("k", "v", "o"))
    latent = _latent(model, stats)
    before = _state(latent)
    result = recover("layerwise", latent, model, None, stats, config, progress=False, merge="mean")
    assert all(final < 0.8 * initial for initial, final in result.layer_losses)
    changed = _changed(before, latent)
    assert {
        "model.layers.0.self_attn.k_proj.down.weight",
        "model.layers.0.self_attn.o_proj.weight",
    } <= changed
    identity = gqa.convert(copy.deepcopy(model), gqa.current_grouping(model))
    recover("layerwise", identity, model, None, stats, config, progress=False, merge="mean")
    assert len(list((tmp_path / "layer_fits").iterdir())) == 2  # latent fits and plain fits


def test_finetune_trains_latent_factors(model, stats, smol_tokenizer):
    latent = _latent(model, stats)
    before = _state(latent)
    config = FinetuneConfig(**TINY_FINETUNE)
    recover("finetune", latent, model, smol_tokenizer, None, config, progress=False)
    assert _changed(before, latent) == {
        f"model.layers.{i}.self_attn.{name}"
        for i in range(2)
        for name in ("k_proj.down.weight", "k_proj.up.weight", "v_proj.weight")
    }


# -- layerwise on the converted model's inputs -------------------------------------------------

LOWER_MERGED = Grouping.neighbour(6, 2, [1, 6])  # layer 0 merged to one head, layer 1 exact


def test_converted_inputs_of_the_source_are_its_calibration_inputs(model, stats):
    from objectives.recovery.layerwise import converted_inputs

    adapter = get_adapter(model)
    for layer in range(adapter.num_layers):
        # Another batch size than the calibration's: float32 sums in another order (hidden
        # states of order 1, a few ulps of float32 after two layers).
        got = converted_inputs(model, adapter, layer, stats.token_ids, batch_size=4)
        torch.testing.assert_close(got, stats.layers[layer].inputs, rtol=1e-5, atol=1e-5)


def test_layerwise_on_converted_inputs_trains_an_exact_layer_to_undo_the_drift_below(
    model, stats, tmp_path, monkeypatch
):
    """Layer 0 sees the source's inputs either way, so its fit is the same. Layer 1 keeps the
    source's grouping: fitted on the source's inputs it is exact and left alone; fitted on what
    the merged layer 0 feeds it, it starts off the source's outputs and is trained toward them."""
    monkeypatch.setenv("HEADGROUP_CACHE", str(tmp_path))
    fits = {}
    for inputs in ("source", "converted"):
        converted = gqa.convert(copy.deepcopy(model), LOWER_MERGED)
        before = _state(converted)
        config = LayerwiseConfig(steps=6, lr=1e-2, batch_size=3, inputs=inputs, holdout=0.0)
        result = recover("layerwise", converted, model, None, stats, config, progress=False)
        changed = _changed(before, converted)
        fits[inputs] = result, converted, {n for n in changed if ".layers.1." in n}
    (source_fit, source_model, source_l1), (conv_fit, conv_model, conv_l1) = fits.values()
    assert conv_fit.layer_losses[0] == source_fit.layer_losses[0]
    for name, p in source_model.named_parameters():
        if ".layers.0." in name:
            assert torch.equal(p, dict(conv_model.named_parameters())[name])
    assert source_fit.layer_losses[1] == (pytest.approx(0.0, abs=1e-10),) * 2 and not source_l1
    initial, final = conv_fit.layer_losses[1]
    assert initial > 1e-6 and final < initial
    assert conv_l1 == _projection_names(conv_model, ("k", "v")) & {
        n for n, _ in conv_model.named_parameters() if ".layers.1." in n
    }


def test_layerwise_fits_on_converted_inputs_are_cached_by_the_groupings_below(
    model, stats, tmp_path, monkeypatch
):
    from objectives.recovery.layerwise import LayerFitCache

    monkeypatch.setenv("HEADGROUP_CACHE", str(tmp_path))
    config = LayerwiseConfig(steps=2, lr=1e-2, batch_size=3, inputs="converted")
    first = gqa.convert(copy.deepcopy(model), LOWER_MERGED)
    r1 = recover("layerwise", first, model, None, stats, config, progress=False, merge="mean")
    calls = _counted_fits(monkeypatch)
    again = gqa.convert(copy.deepcopy(model), LOWER_MERGED)
    r2 = recover("layerwise", again, model, None, stats, config, progress=False, merge="mean")
    assert calls == [] and r2.layer_losses == r1.layer_losses
    # Another layer 0 below the same layer 1: layer 1 is fitted anew (layer 0 too).
    other = Grouping.neighbour(6, 2, [2, 6])
    recover(
        "layerwise",
        gqa.convert(copy.deepcopy(model), other),
        model,
        None,
        stats,
        config,
        progress=False,
        merge="mean",
    )
    assert len(calls) == 2
    cache = LayerFitCache(stats, "mean", config)
    layer1 = LOWER_MERGED.layers[1]
    assert cache.path(1, layer1, [LOWER_MERGED.layers[0]]) != cache.path(
        1, layer1, [other.layers[0]]
    )
    assert cache.folder != LayerFitCache(stats, "mean", LayerwiseConfig(steps=2)).folder
    assert "inputs" not in LayerwiseConfig().fit_key()  # fits cached before it stay valid


def test_layerwise_inputs_must_be_source_or_converted():
    with pytest.raises(
        ValueError, match="layerwise inputs must be one of source, converted, got 'x'"
    ):
        LayerwiseConfig(inputs="x")
