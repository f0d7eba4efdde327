"""Baselines evaluated by the same code as FlowNP: the exact GP oracle (synthetic data), GP regression
with kernel hyperparameters fitted to each task's context, and inverse-distance weighting."""
