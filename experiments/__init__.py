"""Experiments: benchmark configs, the `run` command, results folders and reports.

    python -m experiments.run --config demo          # offline end-to-end demo
    python -m experiments.report runs/a runs/b       # one table and one chart for several runs

`run.run_experiment(config, workdir)` is the importable entry point (notebooks, ablation grids).
"""
