"""Training for block-diffusion models: pretraining from scratch and MAGE-FT self-distillation.

config.py (the run's JSON config), data.py (tokenized, packed, index-addressed sequences),
objective.py (noising, losses, the three MAGE-FT passes), trainer.py (optax step, orbax
checkpoints, logging, export), __main__.py (the absl command line; docs/training.md).
"""
