"""Hyperparameter search over robustft runs with Optuna (issue #27): the search space of a config
(`space`), the study storage and its bookkeeping (`study`), and the sweep itself (`sweep`), which the Hydra
sweeper plugin `hydra/sweeper=optuna` (hydra_plugins/robustft_optuna_sweeper) drives. docs/tuning.md."""
