"""Benchmark scripts, apart from the CLI and the reports: each measures one question and writes
its results under results/bench (results/bench/README.md has one entry per script). Run them from
the repository root, `python experiments/benchmarks/bench_<name>.py`; what they share is in
`experiments.benchmarks.common`."""
