"""The `headgroup` command line: thin wrappers that parse flags, call the library, write results.

Bad input (unknown model, bad grouping file, unknown task, ...) prints one line on stderr and
exits with status 2; nothing is half-written because results are written atomically.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import torch
from transformers.utils import logging as hf_logging

import gqa
import gqa.merge
from gqa.adapters import get_adapter
from gqa.assets import MissingAssetError
from gqa.grouping import Grouping, GroupingError, write_text_atomic
from gqa.models import LoadedModel, load_model

# ImportError: an optional extra (harness, dashboard, postgres) that is not installed.
USER_ERRORS = (
    GroupingError,
    MissingAssetError,
    FileNotFoundError,
    ValueError,
    KeyError,
    OSError,
    ImportError,
)
COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable]] = {}


class UsageError(Exception):
    """Raised by commands for bad input; printed as one line, exit status 2."""


def command(name: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    def decorate(run: Callable[[argparse.Namespace], int | None]):
        COMMANDS[name] = (add_arguments, run)
        return run

    return decorate


def kv_summary(loaded: LoadedModel, dtype_bytes: int = 2) -> dict:
    """KV-cache heads and steady-state bytes per token of a model as it is now (16-bit unless it
    has a precision plan)."""
    grouping = gqa.current_grouping(loaded.model)
    head_dim = get_adapter(loaded.model).head_dim
    plan = gqa.model_precision(loaded.model)
    kv_bytes = grouping.kv_bytes_per_token(head_dim, dtype_bytes)
    if gqa.model_latent(loaded.model) is not None:  # convert: latent layers, any precision
        kv_bytes = gqa.cache_bytes_per_token(loaded.model, dtype_bytes)
    elif plan is not None:
        counts = [(len(layer.k), len(layer.v)) for layer in grouping.layers]
        kv_bytes = plan.bytes_per_token(*zip(*counts, strict=True), head_dim, dtype_bytes)
    return {"kv_heads": grouping.kv_heads(), "kv_bytes_per_token": kv_bytes}


# -- convert ---------------------------------------------------------------------------------------


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="registered name, saved folder, or HF id/path")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--grouping", type=Path, help="grouping JSON file")
    how.add_argument("--kv-heads", type=int, help="neighbour grouping with G KV heads per layer")
    p.add_argument(
        "--kv-bits",
        type=_numbers(int, "integers"),
        default=None,
        help="KV-cache bits K[,V] in every layer (2, 3, 4, 8, 16); without a grouping the "
        "model keeps its own heads",
    )
    p.add_argument("--kv-group", type=int, default=32, help="quantization group size (default 32)")
    p.add_argument(
        "--kv-window", type=int, default=0, help="recent tokens kept in full precision (default 0)"
    )
    p.add_argument(
        "--latent-ranks",
        type=_numbers(int, "integers"),
        default=None,
        help="latent K/V ranks K[,V] in every layer (gqa.latent; 0 keeps that kind's heads): "
        "calibrates (cached) first; with --kv-bits the latents are quantized",
    )
    p.add_argument(
        "--latent-rope-pairs",
        type=int,
        default=None,
        help="latent keys with MHA2MLA's partial RoPE: this many rotary pairs per KV group stay "
        "rotated and cached beside the K rank (chosen by query-key norm on calibration data); "
        "default: Palu's keys, rebuilt from the latent and rotated every step",
    )
    p.add_argument(
        "--merge",
        default="mean",
        help="merge method (default: mean); query_aware and aligned calibrate (cached) first",
    )
    p.add_argument(
        "--recovery",
        action="append",
        default=[],
        help="recovery method run after the merge (repeat for a chain), default configs",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (HF format)")


@command("convert", _convert_args)
def run_convert(args: argparse.Namespace) -> None:
    what = (args.grouping, args.kv_heads, args.kv_bits, args.latent_ranks)
    if all(given is None for given in what):
        raise UsageError("give --grouping, --kv-heads, --kv-bits or --latent-ranks")
    if args.kv_bits is not None and len(args.kv_bits) not in (1, 2):
        raise UsageError(f"--kv-bits takes K or K,V, got {len(args.kv_bits)} numbers")
    if args.latent_ranks is not None and len(args.latent_ranks) not in (1, 2):
        raise UsageError(f"--latent-ranks takes K or K,V, got {len(args.latent_ranks)} numbers")
    loaded = load_model(args.model)
    adapter = get_adapter(loaded.model)
    plan = latent = None
    if args.kv_bits is not None:  # checked before any work: bits, group size, window
        plan = gqa.PrecisionPlan.uniform(
            adapter.num_layers, *args.kv_bits, group_size=args.kv_group, window=args.kv_window
        )
        plan.check_model(adapter.num_layers, adapter.head_dim)
    pairs = args.latent_rope_pairs
    if pairs is not None and (args.latent_ranks is None or not args.latent_ranks[0]):
        raise UsageError("--latent-rope-pairs needs a latent K: give --latent-ranks K[,V]")
    if pairs is not None and not 0 < pairs < adapter.head_dim // 2:
        raise UsageError(f"--latent-rope-pairs must lie in 1..{adapter.head_dim // 2 - 1}")
    if args.latent_ranks is not None:  # checked before any work: family, ranks, bits
        ranks = [r or None for r in args.latent_ranks]
        latent = gqa.LatentPlan.uniform(adapter.num_layers, ranks[0], ranks[-1])
        gqa.latent.check_family(loaded.model.config.model_type)
        try:
            gqa.precision.check_latent_layers(plan, latent.to_dict())
        except gqa.PrecisionError as exc:
            raise UsageError(f"--latent-ranks with --kv-bits: {exc}") from None
    if args.grouping is not None:
        grouping = Grouping.load(args.grouping)
    elif args.kv_heads is not None:
        grouping = Grouping.neighbour(adapter.num_heads, adapter.num_layers, args.kv_heads)
    else:
        grouping = gqa.current_grouping(loaded.model)
    if latent is not None:  # ranks against the converted widths, before any work
        widths = [
            (len(lg.k) * adapter.head_dim, len(lg.v) * adapter.head_dim) for lg in grouping.layers
        ]
        checked = latent
        if pairs is not None:  # any pairs: the check needs only how many
            checked = gqa.LatentPlan(
                tuple(
                    gqa.LatentLayer(x.k_rank, x.v_rank, (tuple(range(pairs)),) * len(lg.k))
                    for x, lg in zip(latent.layers, grouping.layers, strict=True)
                )
            )
        checked.check_model(adapter.num_layers, *zip(*widths, strict=True), adapter.head_dim)
    before = kv_summary(loaded)
    gqa.merge.get_merge(args.merge)  # fail on an unknown merge before any work
    stats = source = None
    if args.merge != "mean" or args.recovery or latent is not None:
        from objectives.calibration import calibrate
        from objectives.recovery import get_recovery

        for method in args.recovery:
            get_recovery(method)
        torch.set_grad_enabled(True)  # gradient statistics and recovery train
        stats = calibrate(loaded.model, loaded.tokenizer, model_name=args.model)
        source = copy.deepcopy(loaded.model) if args.recovery else None
    gqa.convert(loaded.model, grouping, merge=args.merge, stats=stats)
    for method in args.recovery:
        from objectives.recovery import recover

        recover(method, loaded.model, source, loaded.tokenizer, stats)
    if latent is not None:
        grams = [layer.gram for layer in stats.layers]
        if pairs is not None:
            latent = gqa.choose_rope_pairs(loaded.model, latent, grams, pairs)
        gqa.apply_latent(loaded.model, latent, grams)
    gqa.apply_precision(loaded.model, plan)
    gqa.save(loaded.model, args.out, tokenizer=loaded.tokenizer)
    after = kv_summary(loaded)
    print(
        f"converted {args.model} -> {args.out}: KV heads {before['kv_heads']} -> {after['kv_heads']}, "
        f"KV bytes/token {before['kv_bytes_per_token']:.0f} -> {after['kv_bytes_per_token']:.0f} "
        f"({100 * after['kv_bytes_per_token'] / before['kv_bytes_per_token']:.1f}%)"
        + (f", cache {plan.label()}" if plan is not None and not plan.exact else "")
    )


# -- eval ------------------------------------------------------------------------------------------


def _eval_args(p: argparse.ArgumentParser) -> None:
    from objectives.evaluate import all_task_names

    p.add_argument("--model", required=True, help="registered name, saved folder, or HF id/path")
    p.add_argument(
        "--tasks",
        default="ppl,arc_easy",
        help=f"comma-separated: {','.join(all_task_names())} (default: ppl,arc_easy)",
    )
    p.add_argument(
        "--long-seq-len",
        type=int,
        default=2048,
        help="long_ppl: tokens per held-out long document (default 2048)",
    )
    p.add_argument("--long-windows", type=int, default=4, help="long_ppl: documents (default 4)")
    p.add_argument(
        "--lengths",
        type=_numbers(int, "integers"),
        default=(1024, 2048),
        help="passkey, mdqa: prompt lengths in tokens (default 1024,2048)",
    )
    p.add_argument(
        "--depths",
        type=_numbers(float, "numbers"),
        default=(0.1, 0.3, 0.5, 0.7, 0.9),
        help="passkey, mdqa: where the key or gold paragraph sits, 0..1 (default 0.1,...,0.9)",
    )
    p.add_argument(
        "--trials", type=int, default=2, help="passkey, mdqa: prompts per length and depth"
    )
    p.add_argument("--limit", type=int, default=None, help="questions per task (default: all)")
    p.add_argument(
        "--ppl-windows", type=int, default=48, help="held-out windows for ppl (default 48)"
    )
    p.add_argument("--seq-len", type=int, default=256, help="tokens per ppl window (default 256)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--json", type=Path, default=None, help="write results as JSON here")
    p.add_argument(
        "--harness",
        choices=("headgroup", "lm-eval"),
        default="headgroup",
        help="multiple-choice scorer: headgroup's own, or lm-eval's HFLM (headgroup[harness])",
    )


def evaluate_loaded(loaded: LoadedModel, args: argparse.Namespace) -> dict:
    from objectives.data import TextSpec
    from objectives.evaluate import evaluate
    from objectives.long_context import LongContextConfig

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"--limit must be at least 1, got {args.limit}")
    defaults = LongContextConfig()
    long_config = defaults.with_seq_len(
        getattr(args, "long_seq_len", defaults.seq_len),
        ppl_windows=getattr(args, "long_windows", defaults.ppl_windows),
        lengths=getattr(args, "lengths", defaults.lengths),
        depths=getattr(args, "depths", defaults.depths),
        trials=getattr(args, "trials", defaults.trials),
    )
    spec = TextSpec("eval", args.seq_len, args.ppl_windows)
    harness = getattr(args, "harness", "headgroup")
    own = [t for t in tasks if harness == "headgroup" or t == "ppl"]
    results = evaluate(
        loaded.model,
        loaded.tokenizer,
        own,
        limit=args.limit,
        ppl_spec=spec,
        batch_size=args.batch_size,
        long_config=long_config,
    )
    if harness == "lm-eval":  # perplexity stays ours: lm-eval has no such task offline
        from objectives.harness import evaluate_harness

        choice = [t for t in tasks if t != "ppl"]
        results.update(
            evaluate_harness(loaded.model, loaded.tokenizer, choice, args.limit, args.batch_size)
        )
        results = {task: results[task] for task in tasks}
    return {"model": loaded.name, **kv_summary(loaded), "limit": args.limit, "results": results}


def format_results(report: dict) -> str:
    parts = [f"{report['model']}: KV {report['kv_bytes_per_token']} B/token"]
    for task, value in report["results"].items():
        if "buckets" in value:
            buckets = ", ".join(f"{k}: {v:.2f}" for k, v in value["buckets"].items())
            parts.append(f"{task} at {value['seq_len']} tokens: ppl by position {buckets}")
        elif "by_length" in value:
            lengths = ", ".join(f"{k}: {v:.2f}" for k, v in value["by_length"].items())
            parts.append(
                f"{task} accuracy {value['accuracy']:.3f} (n={value['n']}; by length {lengths})"
            )
        elif "perplexity" in value:
            parts.append(f"ppl {value['perplexity']:.2f} ({value['tokens']} tokens)")
        else:
            parts.append(
                f"{task} acc {value['acc']:.3f} acc_norm {value['acc_norm']:.3f} (n={value['n']})"
            )
    return " | ".join(parts)


@command("eval", _eval_args)
def run_eval(args: argparse.Namespace) -> None:
    report = evaluate_loaded(load_model(args.model), args)
    print(format_results(report))
    if args.json is not None:
        write_text_atomic(args.json, json.dumps(report, indent=1) + "\n")


# -- demo ------------------------------------------------------------------------------------------


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=Path("experiments/configs/demo.toml"))
    p.add_argument(
        "--out", type=Path, default=None, help="results folder (default results/<study>)"
    )


@command("demo", _demo_args)
def run_demo(args: argparse.Namespace) -> None:
    """The main job: run a study config end to end, then write all reports and a README."""
    from experiments.main_job import run_main_job

    torch.set_grad_enabled(True)
    readme = run_main_job(args.config, args.out)
    print(f"wrote {readme.parent}/ (see {readme})")


# -- study ---------------------------------------------------------------------------------------


def _study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="study TOML file")
    p.add_argument("--storage", default=None, help="override [study] storage (e.g. journal:f.log)")
    p.add_argument("--stage", choices=("all", "1", "2"), default="all", help="run only one stage")
    p.add_argument(
        "--seed", type=int, default=None, help="another seed: study NAME-sSEED in the same storage"
    )


@command("study", _study_args)
def run_study(args: argparse.Namespace) -> None:
    """Run (or resume, or join as a worker) the two-stage search study of a config."""
    from search.config import StudyConfig
    from search.results import summary_table
    from search.study import Study

    config = StudyConfig.load(args.config)
    if args.storage:
        config = dataclasses.replace(config, storage=args.storage)
    if args.seed is not None:
        config = dataclasses.replace(config, seed=args.seed, name=f"{config.name}-s{args.seed}")
    torch.set_grad_enabled(True)  # calibration and recovery need gradients
    study = Study(config)
    start = time.time()
    with study.timed():
        stage1 = study.stage1() if args.stage in ("all", "1") else study.load_stage1()
        if args.stage in ("all", "2"):
            study.stage2(stage1)
    print(summary_table(config.name, study.storage))
    print(f"study {config.name}: done in {time.time() - start:.0f} s (storage {config.storage})")


# -- reports -------------------------------------------------------------------------------------


def _report_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True, action="append", help="study name (repeat: seeds)")
    p.add_argument(
        "--storage", required=True, help="storage URL, e.g. sqlite:///results/default/study.db"
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")


@command("pareto", _report_args)
def run_pareto(args: argparse.Namespace) -> None:
    """Plot accuracy and perplexity against KV-cache size, with the Pareto front."""
    from experiments.reports import pareto_report

    for name in args.study:
        paths = pareto_report(name, args.storage, args.out)
        print(f"wrote {paths['png']} and {paths['csv']}")


@command("ablate", _report_args)
def run_ablate(args: argparse.Namespace) -> None:
    """Ablation tables (Markdown, CSV, LaTeX); several --study are averaged as seeds."""
    from experiments.reports import ablation_report

    paths = ablation_report(args.study, args.storage, args.out)
    print(f"wrote {paths['md']}, {paths['csv']} and {paths['tex']}")


# -- export ----------------------------------------------------------------------------------------


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--study", required=True, help="study name")
    p.add_argument("--storage", required=True, help="the study's storage URL")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", type=int, help="stage-2 trial number")
    which.add_argument(
        "--budget", type=float, help="the best searched candidate at this budget (validation)"
    )
    p.add_argument("--out", type=Path, required=True, help="output folder")


@command("export", _export_args)
def run_export(args: argparse.Namespace) -> int:
    """Rebuild a stage-2 candidate (merge, calibration, recovery), save it with a model card."""
    from search.export import export

    torch.set_grad_enabled(True)  # recovery trains
    command = "headgroup " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["export"] else ""
    result = export(
        args.study, args.storage, args.out, trial=args.trial, budget=args.budget, command=command
    )
    verdict = "matches" if result.matches else "DOES NOT MATCH"
    print(
        f"exported stage-2 trial {result.trial.number} of {args.study} -> {result.folder} "
        f"(model card {result.folder / 'README.md'})\n"
        f"{result.metric}: {result.measured:.4f} recomputed, {result.recorded:.4f} recorded "
        f"by the study: {verdict}"
    )
    return 0 if result.matches else 1


# -- dashboard -------------------------------------------------------------------------------------


def _dashboard_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", required=True, help="storage URL, e.g. sqlite:///study.db")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")


@command("dashboard", _dashboard_args)
def run_dashboard(args: argparse.Namespace) -> None:
    """Serve optuna-dashboard on a study storage (until interrupted)."""
    from search.storage import make_storage

    storage = make_storage(args.storage)  # bad URL or server: one line, exit 2
    try:
        from optuna_dashboard import run_server
    except ImportError:
        raise UsageError(
            "dashboard needs optuna-dashboard: pip install 'headgroup[dashboard]'"
        ) from None
    print(f"optuna-dashboard on http://{args.host}:{args.port}/ (storage {args.storage})")
    sys.stdout.flush()
    run_server(storage, host=args.host, port=args.port)


# -- compare -------------------------------------------------------------------------------------


def _numbers(kind: type, what: str):
    """An argparse type: comma-separated values of `kind` ("2,1.5" -> (2.0, 1.5))."""

    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}, got {text!r}"
            ) from None

    return parse


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, required=True, help="the finished study's TOML file")
    p.add_argument(
        "--budgets",
        type=_numbers(float, "numbers"),
        default=None,
        help="compare: KV heads per layer, e.g. 2,1.5; compare-bytes: fractions of the source's "
        "cache, e.g. 0.2,0.17 (default: all)",
    )
    p.add_argument(
        "--seeds",
        type=_numbers(int, "integers"),
        default=(0, 1),
        help="recovery seeds (default 0,1)",
    )
    p.add_argument("--windows", type=int, default=48, help="test windows of seq_len tokens")
    p.add_argument("--limit", type=int, default=300, help="test questions per task (0: none)")
    p.add_argument(
        "--context",
        type=int,
        default=0,
        help="compare at long context: late-position perplexity of held-out documents of this "
        "many tokens and passkey retrieval (default 0: the study's short windows)",
    )
    p.add_argument("--out", type=Path, default=None, help="default results/<study>")


def _check_compare_args(args: argparse.Namespace) -> None:
    if not args.seeds or args.windows < 2 or args.limit < 0:
        raise UsageError("--seeds needs at least one seed, --windows >= 2 and --limit >= 0")
    if args.context and args.context < 64:
        raise UsageError(f"--context must be 0 or at least 64 tokens, got {args.context}")


@command("compare", _compare_args)
def run_compare_command(args: argparse.Namespace) -> None:
    """After recovery, the searched winner vs neighbour_kv and neighbour on test data, with CIs."""
    from experiments.compare import CompareConfig, run_compare

    _check_compare_args(args)
    torch.set_grad_enabled(True)  # recovery trains
    options = CompareConfig(
        args.budgets, args.seeds, args.windows, args.limit, context=args.context
    )
    path = run_compare(args.config, options, args.out)
    print(path.read_text())


def _compare_bytes_args(p: argparse.ArgumentParser) -> None:
    _compare_args(p)
    p.add_argument(
        "--control",
        action="store_true",
        help="also compare the joint winner with the best single-axis point rebuilt on the source "
        "recovered by the study's chain (the same recipe and text as every recovered point)",
    )


@command("compare-bytes", _compare_bytes_args)
def run_compare_bytes_command(args: argparse.Namespace) -> None:
    """Per byte budget, the joint winner vs the best single-axis point on test data, with CIs."""
    from experiments.compare_bytes import ByteCompareConfig, run_compare_bytes

    _check_compare_args(args)
    torch.set_grad_enabled(True)  # recovery trains
    options = ByteCompareConfig(
        args.budgets,
        args.seeds,
        args.windows,
        args.limit,
        context=args.context,
        control=args.control,
    )
    print(run_compare_bytes(args.config, options, args.out).read_text())


# -- entry point -----------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own errors: one line, exit 2
        self.exit(2, f"headgroup: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="headgroup", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, (add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(
            name, help=(run.__doc__ or "").strip().splitlines()[0] if run.__doc__ else None
        )
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    hf_logging.disable_progress_bar()  # per-tensor loading bars are noise; our own bars remain
    optuna.logging.set_verbosity(
        optuna.logging.WARNING
    )  # a line per trial drowns the progress bars
    args = build_parser().parse_args(argv)
    grad = torch.is_grad_enabled()
    torch.set_grad_enabled(False)  # commands that train (study, demo) turn it back on
    try:
        code = args.run(args) or 0
    except (UsageError, *USER_ERRORS) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if type(exc) is KeyError:  # str() is only the key: say what is missing
            message = f"missing {message} in the records read (has the study run this far?)"
        print(f"headgroup: error: {message}", file=sys.stderr)
        return 2
    finally:
        torch.set_grad_enabled(grad)
    return code


if __name__ == "__main__":
    sys.exit(main())
