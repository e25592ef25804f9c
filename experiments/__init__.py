"""Experiments: benchmark configs, the `run`, `ablate`, `report` and `predict` commands, and
results folders; `run.run_experiment(config, workdir)` is the importable entry point."""
