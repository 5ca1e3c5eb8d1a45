"""The command line: conversions and evaluations end to end, and one-line errors with exit 2."""

import json

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

import gqa
from experiments.cli import main
from gqa.adapters import ADAPTERS
from gqa.grouping import Grouping
from tests.tiny import tiny_model


@pytest.fixture()
def tiny_folder(tmp_path, smol_tokenizer):
    """A saved tiny stock model with a real tokenizer (vocab trimmed is not needed: ids < 97)."""
    model = tiny_model(num_kv_heads=3, vocab_size=smol_tokenizer.vocab_size + 100)
    path = tmp_path / "tiny"
    gqa.save(model, path, tokenizer=smol_tokenizer)
    return path


def test_convert_with_kv_heads_then_eval(tiny_folder, tmp_path, capsys):
    out = tmp_path / "converted"
    assert main(["convert", "--model", str(tiny_folder), "--kv-heads", "4", "--out", str(out)]) == 0
    assert (
        "KV heads 12 -> 16" in capsys.readouterr().out
    )  # 2 layers x (K+V) x G: 3 -> 4 groups of 6 heads
    assert gqa.load(out).config.headgroup["layers"][0]["k"] == [[0, 1], [2, 3], [4], [5]]
    report = tmp_path / "r.json"
    code = main(
        [
            "eval",
            "--model",
            str(out),
            "--tasks",
            "ppl,piqa",
            "--limit",
            "3",
            "--ppl-windows",
            "2",
            "--seq-len",
            "16",
            "--json",
            str(report),
        ]
    )
    assert code == 0
    data = json.loads(report.read_text())
    assert data["results"]["ppl"]["tokens"] == 2 * 15
    assert data["results"]["piqa"]["n"] == 3
    assert data["kv_heads"] == 16


def test_convert_with_latent_ranks(tiny_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HEADGROUP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "latent"
    argv = ["convert", "--model", str(tiny_folder), "--latent-ranks", "8,0", "--out", str(out)]
    assert main(argv) == 0
    # 2 layers: K 8 latent values + V 3 heads of 8 = 32 values, 64 B (of 2 x 48 x 2 = 192 B)
    assert "KV bytes/token 192 -> 128 (66.7%)" in capsys.readouterr().out
    loaded = gqa.load(out)
    assert gqa.model_latent(loaded) == gqa.LatentPlan.uniform(2, 8, None)


def test_convert_with_quantized_latents(tiny_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HEADGROUP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "latent"
    argv = ["convert", "--model", str(tiny_folder), "--latent-ranks", "8", "--kv-bits", "4"]
    assert main([*argv, "--kv-group", "8", "--out", str(out)]) == 0
    # per layer K and V latents of 8 values at 4 bits, a float16 scale and zero per 8: 8 B each
    assert "KV bytes/token 192 -> 32 (16.7%), cache K4/V4 g8" in capsys.readouterr().out
    loaded = gqa.load(out)
    assert gqa.model_latent(loaded) == gqa.LatentPlan.uniform(2, 8, 8)
    assert gqa.model_precision(loaded).label() == "K4/V4 g8"


def test_convert_with_partial_rope_keys(tiny_folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HEADGROUP_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "latent"
    argv = ["convert", "--model", str(tiny_folder), "--latent-ranks", "6,0"]
    assert main([*argv, "--latent-rope-pairs", "1", "--out", str(out)]) == 0
    # per layer: 3 K groups x 2 rotary values + rank 6 = 12 key values, V 3 heads of 8 = 24
    assert "KV bytes/token 192 -> 144 (75.0%)" in capsys.readouterr().out
    plan = gqa.model_latent(gqa.load(out))
    assert all(layer.k_rank == 6 and layer.rope_dims == 2 for layer in plan.layers)


def test_convert_with_grouping_file(tiny_folder, tmp_path):
    grouping = Grouping.create(6, [[[0, 5], [1, 2, 3, 4]], [[0], [1, 2, 3, 4, 5]]])
    grouping.save(tmp_path / "g.json")
    out = tmp_path / "c"
    assert (
        main(
            [
                "convert",
                "--model",
                str(tiny_folder),
                "--grouping",
                str(tmp_path / "g.json"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert gqa.model_grouping(gqa.load(out)) == grouping


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["convert", "--model", "{m}", "--kv-heads", "7", "--out", "{t}/x"],
            "cannot split 6 heads into 7 groups",
        ),
        (
            ["convert", "--model", "{m}", "--grouping", "{t}/none.json", "--out", "{t}/x"],
            "none.json does not exist",
        ),
        (["convert", "--model", "{m}", "--grouping", "{t}/bad.json", "--out", "{t}/x"], "bad JSON"),
        (
            ["convert", "--model", "{m}", "--grouping", "{t}/three.json", "--out", "{t}/x"],
            "wrong number of layers",
        ),
        (
            ["convert", "--model", "{m}", "--kv-heads", "2", "--merge", "nope", "--out", "{t}/x"],
            "unknown merge method 'nope'",
        ),
        (
            ["convert", "--model", "./missing", "--kv-heads", "2", "--out", "{t}/x"],
            "no such folder",
        ),
        (
            [
                "convert",
                "--model",
                "{m}",
                "--latent-ranks",
                "8,12",
                "--kv-bits",
                "4",
                "--kv-group",
                "8",
                "--out",
                "{t}/x",
            ],
            "layer 0: group_size 8 does not divide the latent V rank 12",
        ),
        (
            ["convert", "--model", "{m}", "--kv-heads", "2", "--latent-rope-pairs", "1"]
            + ["--out", "{t}/x"],
            "--latent-rope-pairs needs a latent K",
        ),
        (
            ["convert", "--model", "{m}", "--latent-ranks", "8", "--latent-rope-pairs", "4"]
            + ["--out", "{t}/x"],
            "--latent-rope-pairs must lie in 1..3",
        ),
        (
            ["convert", "--model", "{m}", "--latent-ranks", "19", "--latent-rope-pairs", "1"]
            + ["--out", "{t}/x"],
            "layer 0: K rank 19 exceeds the 18 values it replaces",
        ),
        (
            ["convert", "--model", "{m}", "--latent-ranks", "30", "--out", "{t}/x"],
            "layer 0: K rank 30 exceeds the 24 values it replaces",
        ),
        (["eval", "--model", "{m}", "--tasks", "ppl,nope"], "nope"),
        (["eval", "--model", "{m}", "--limit", "0"], "--limit must be at least 1"),
        (["eval", "--model", "{m}", "--depths", "1.5"], "depths must lie in [0, 1]"),
        (["eval", "--model", "{m}", "--lengths", "10"], "lengths must be >= 64 tokens"),
        (
            ["convert", "--model", "{m}", "--out", "{t}/x"],
            "give --grouping, --kv-heads, --kv-bits or --latent-ranks",
        ),
        (["frobnicate"], "invalid choice"),
        (["study", "--config", "{t}/bad.toml"], "not valid TOML"),
        (["study", "--config", "{t}/nokey.toml"], "search.budgets: required"),
        (["demo", "--config", "{t}/missing.toml"], "missing.toml does not exist"),
        (
            ["pareto", "--study", "s", "--storage", "sqlite:///{t}/none.db", "--out", "{t}/x"],
            "does not exist",
        ),
        (
            ["pareto", "--study", "s", "--storage", "bogus://x", "--out", "{t}/x"],
            "unsupported scheme 'bogus'",
        ),
        (["study", "--config", "{t}/ok.toml", "--storage", "sqlite:/x.db"], "malformed sqlite"),
        (
            ["ablate", "--study", "s", "--storage", "postgresql://u@h:port/d", "--out", "{t}/x"],
            "malformed URL",
        ),
        (
            [
                "pareto",
                "--study",
                "s",
                "--storage",
                "postgresql://u@127.0.0.1:1/d",
                "--out",
                "{t}/x",
            ],
            "cannot connect",
        ),
        (["dashboard", "--storage", "mongodb://h/x"], "unsupported scheme 'mongodb'"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, message, tiny_folder, tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{oops")
    (tmp_path / "bad.toml").write_text("[study\n")
    (tmp_path / "nokey.toml").write_text('[study]\nname = "s"\n[model]\nname = "m"\n[search]\n')
    Grouping.neighbour(6, 3, 2).save(tmp_path / "three.json")
    (tmp_path / "ok.toml").write_text(
        f'[study]\nname = "s"\n[model]\nname = "{tiny_folder}"\n[search]\nbudgets = [2.0]\n'
    )
    argv = [a.format(m=tiny_folder, t=tmp_path) for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("headgroup: error:")
    assert message in err[0]
    assert not (tmp_path / "x").exists()


def test_convert_of_an_unsupported_family_names_the_supported_ones(
    tmp_path, smol_tokenizer, capsys
):
    config = AutoConfig.for_model(
        "bloom", vocab_size=smol_tokenizer.vocab_size + 100, hidden_size=48, n_layer=1, n_head=6
    )
    gqa.save(AutoModelForCausalLM.from_config(config), tmp_path / "bloom", tokenizer=smol_tokenizer)
    capsys.readouterr()  # the save's progress bars
    argv = ["convert", "--model", str(tmp_path / "bloom"), "--kv-heads", "2"]
    code = main([*argv, "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "model_type 'bloom' has no headgroup adapter" in err[0]
    supported = err[0].split("(supported: ")[1].split(")")[0].split(", ")
    assert supported == sorted(ADAPTERS) and len(supported) == 20
    assert not (tmp_path / "x").exists()


def test_eval_long_context_tasks(tiny_folder, tmp_path, capsys):
    report = tmp_path / "long.json"
    argv = ["eval", "--model", str(tiny_folder), "--tasks", "long_ppl,passkey"]
    argv += ["--long-seq-len", "96", "--long-windows", "2", "--lengths", "96,128"]
    argv += ["--depths", "0.5", "--trials", "1", "--json", str(report)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "long_ppl at 96 tokens: ppl by position 0-47:" in out and "passkey accuracy" in out
    results = json.loads(report.read_text())["results"]
    assert set(results["long_ppl"]["buckets"]) == {"0-47", "48-95"}  # edges below 96: half
    assert results["passkey"]["n"] == 2 and set(results["passkey"]["by_length"]) == {"96", "128"}


def test_a_missing_key_says_what_is_missing(monkeypatch, capsys):
    from experiments import cli

    def fails(args):
        raise KeyError("state")

    add_arguments, _ = cli.COMMANDS["pareto"]
    monkeypatch.setitem(cli.COMMANDS, "pareto", (add_arguments, fails))
    assert main(["pareto", "--study", "s", "--storage", "sqlite:///x.db", "--out", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "headgroup: error: missing 'state' in the records read (has the study run this far?)"
    )
