"""Does distilling on longer windows bring back retrieval past the study's context?

The default study recovers its candidates with layer-wise fits and then distillation on 2048-token
`reading` windows, and selects at 2048 tokens. Its 2-KV winner finds every test key up to 2048
tokens but 7 of 10 at 4096 (the source 10): no step of its recovery ever sees a distance over 2048.

This benchmark rebuilds that winner (`results/default_2048/groupings/2kv_evolutionary_*.json`,
the default config's calibration, merge and layer-wise fits) and distils it under each arm of
`--arms`: WINDOWxBATCH, windows of WINDOW tokens, BATCH of them a step, the study's recipe
otherwise (its tokens, lr and schedule); WINDOWxBATCH@TOKENS distils on TOKENS tokens instead
(the same peak lr and cosine schedule over more steps), which asks how far more tuning closes
the gap to the source. The other arms are paired against the first: 2048x2, the windows that
recovered the study's results (results/default_2048), for the window question; 4096x1, what
`default.toml` now distils on (this benchmark chose it), for the tokens question.
Each arm, and the source as the reference, is scored

  on validation  late-bucket perplexity (positions 1024-4095) of 4 validation papers of 4096
                 tokens times the perplexity of the keys of 6 validation passkeys at 4096 tokens,
                 which chooses; and the study's own objective at 2048 tokens, reported;
  on test        passkeys at 4096 tokens (5 depths x 2 prompts) and late-bucket perplexity of 4
                 test papers of 4096 tokens; at 2048 tokens what the study reports: late bucket
                 of 16 test papers and its 12 test passkeys. Paired intervals against the first
                 arm: late ppl at 2048 over papers, passkeys at 4096 over prompts.

Rows go to `long_window.csv` as they finish (a stopped run resumes; arms of other runs are
reused); the summary of this run's arms to `--summary` (`long_window.json`).

    python experiments/benchmarks/bench_long_window.py [--arms 2048x2,4096x1]
    python experiments/benchmarks/bench_long_window.py --summary long_window_tokens.json \
        --arms 4096x1,4096x1@98304
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

from experiments.benchmarks import common
from gqa.grouping import write_text_atomic
from objectives.evaluate import SCORED_TASKS
from objectives.long_context import LongContextConfig
from objectives.significance import paired_accuracy, paired_bootstrap
from search.config import StudyConfig

GROUPING = "results/default_2048/groupings/2kv_evolutionary_*.json"
LONG = 4096
DEFAULT_ARMS = "2048x2,4096x1"
SOURCE = "source"  # the reference row: the source model, scored as every arm is


@dataclasses.dataclass(frozen=True)
class Window:
    """One distillation arm: windows of `seq_len` tokens, `batch_size` of them a step, `tokens`
    in all (None: the study's budget)."""

    seq_len: int
    batch_size: int
    tokens: int | None = None

    @classmethod
    def parse(cls, spec: str) -> Window:
        """ "WINDOWxBATCH" or "WINDOWxBATCH@TOKENS"; a ValueError naming the spec otherwise."""
        shape, _, tokens = spec.partition("@")
        try:
            seq_len, batch_size = (int(part) for part in shape.split("x"))
            budget = int(tokens) if tokens else None
        except ValueError:
            raise ValueError(
                f"arm {spec!r} is not WINDOWxBATCH or WINDOWxBATCH@TOKENS (e.g. 4096x1@98304)"
            ) from None
        if seq_len < 256 or batch_size < 1:
            raise ValueError(f"arm {spec!r}: the window must be >= 256 tokens and the batch >= 1")
        if budget is not None and budget < seq_len * batch_size:
            raise ValueError(f"arm {spec!r}: {budget} tokens do not fill one step of the arm")
        return cls(seq_len, batch_size, budget)

    def config(self, base: StudyConfig) -> StudyConfig:
        """`base` whose distillation reads these windows and tokens (every other field kept)."""
        recovery = dict(base.promote.recovery_config)
        budget = {} if self.tokens is None else {"tokens": self.tokens}
        recovery["finetune"] = {
            **recovery.get("finetune", {}),
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            **budget,
        }
        promote = dataclasses.replace(base.promote, recovery_config=recovery)
        return dataclasses.replace(base, promote=promote)


def settings(study_long: LongContextConfig) -> dict[str, LongContextConfig]:
    """The long-context settings each score reads, from the study's [long_context]."""
    long = study_long.with_seq_len(LONG, lengths=(LONG,))
    return {
        "valid": long,
        "test long": dataclasses.replace(long, depths=(0.1, 0.3, 0.5, 0.7, 0.9)),
        "test study": dataclasses.replace(study_long, ppl_windows=16),
    }


def task(model, tokenizer, name: str, subset: str, config: LongContextConfig) -> dict:
    return SCORED_TASKS[name](model, tokenizer, subset=subset, config=config, progress=False)


def scored(model, tokenizer, study, long: dict[str, LongContextConfig]) -> dict:
    """One arm's CSV fields: validation (chooses) and test (reported), outcomes kept."""
    valid_ppl = task(model, tokenizer, "long_ppl", "valid", long["valid"])
    valid_key = task(model, tokenizer, "passkey", "valid", long["valid"])
    key_long = task(model, tokenizer, "passkey", "test", long["test long"])
    ppl_long = task(model, tokenizer, "long_ppl", "test", long["test long"])
    ppl_study = task(model, tokenizer, "long_ppl", "test", long["test study"])
    key_study = task(model, tokenizer, "passkey", "test", long["test study"])
    return {
        "valid": math.exp(valid_ppl["loss"] + valid_key["loss"]),
        "valid_long_ppl": valid_ppl["score"],
        "valid_passkey": valid_key["score"],
        "valid_study_objective": study.validation_ppl(model),
        f"passkey {LONG}": key_long["score"],
        f"key_nll {LONG}": key_long["loss"],
        f"outcomes {LONG}": json.dumps(key_long["outcomes"]),
        f"long_ppl {LONG}": ppl_long["score"],
        "long_ppl": ppl_study["score"],
        "window_loss": json.dumps(ppl_study["window_loss"]),
        "passkey": key_study["score"],
        "key_nll": key_study["loss"],
    }


def summarised(row: dict, first: dict) -> dict:
    """A row's summary, with paired intervals against the first arm (not for the first)."""
    out = {
        key: round(float(row[key]), 3)
        for key in (
            "valid",
            "valid_long_ppl",
            "valid_passkey",
            "valid_study_objective",
            f"passkey {LONG}",
            f"key_nll {LONG}",
            f"long_ppl {LONG}",
            "long_ppl",
            "passkey",
            "key_nll",
        )
    }
    if row is not first:
        ppl = paired_bootstrap(json.loads(row["window_loss"]), json.loads(first["window_loss"]))
        keys = paired_accuracy(
            {"passkey": json.loads(row[f"outcomes {LONG}"])},
            {"passkey": json.loads(first[f"outcomes {LONG}"])},
        )
        out["vs_first"] = {
            "long_ppl": [round(ppl.difference, 2), round(ppl.low, 2), round(ppl.high, 2)],
            f"passkey {LONG}": [round(keys.difference, 3), round(keys.low, 3), round(keys.high, 3)],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arms", default=DEFAULT_ARMS, help="WINDOWxBATCH[@TOKENS], comma-separated"
    )
    parser.add_argument("--out", type=Path, default=common.RESULTS)
    parser.add_argument("--summary", default="long_window.json", help="this run's summary file")
    args = parser.parse_args()
    arms = common.parsed_specs(parser, "--arms", args.arms, Window.parse, "arm")
    start = time.time()
    table = common.CsvRows(args.out / "long_window.csv")
    done = {r["arm"]: r for r in table.rows}
    base = StudyConfig.load(common.DEFAULT_CONFIG)
    long = settings(base.long_context)
    grouping = None
    for spec, window in arms.items():
        if spec in done:
            continue
        grouping = grouping or common.saved_grouping(GROUPING)
        t0 = time.time()
        with common.throwaway_study(window.config(base), progress=True) as study:
            model = study.build_candidate(grouping, progress=True)
            row = {"arm": spec, **scored(model, study.loaded.tokenizer, study, long)}
        row["seconds"] = round(time.time() - t0, 1)
        table.append(row)
        done[spec] = row
        print(json.dumps({k: row[k] for k in ("arm", "valid", "seconds")}), flush=True)
    if SOURCE not in done:  # the reference: what each score reads for the unconverted model
        t0 = time.time()
        with common.throwaway_study(base, progress=True) as study:
            row = {"arm": SOURCE, **scored(study.source, study.loaded.tokenizer, study, long)}
        row["seconds"] = round(time.time() - t0, 1)
        table.append(row)
        done[SOURCE] = row
    first = done[next(iter(arms))]
    chosen = min(arms, key=lambda spec: float(done[spec]["valid"]))
    summary = {
        "command": "python experiments/benchmarks/bench_long_window.py "
        f"--arms {args.arms} --summary {args.summary}",
        "model": "smollm2-135m, the default study's 2-KV winner ("
        + GROUPING
        + "), layer-wise fits and distillation as default.toml recovers, but for the windows "
        "(and the tokens where an arm gives them)",
        "validation": f"late bucket (1024-{LONG - 1}) of {long['valid'].ppl_windows} validation "
        f"papers x key ppl of {len(long['valid'].depths) * long['valid'].trials} validation "
        f"passkeys at {LONG} tokens",
        "test": f"passkeys at {LONG} tokens ({len(long['test long'].depths)} depths x "
        f"{long['test long'].trials}); late bucket of {long['test long'].ppl_windows} test papers "
        f"of {LONG}; at {base.long_context.seq_len}: late bucket of "
        f"{long['test study'].ppl_windows} test papers and the study's test passkeys",
        "chosen_on_validation": chosen,
        "arms": {spec: summarised(done[spec], first) for spec in arms},
        "source": summarised(done[SOURCE], done[SOURCE]),
        "seconds_this_run": round(time.time() - start, 1),
    }
    write_text_atomic(args.out / args.summary, json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
