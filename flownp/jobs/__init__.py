"""Jobs: training, fine-tuning, evaluation, robustness, retraining, the registry and the CLI.
Neither the service nor the Jupyter API imports anything from here."""
