"""Evaluation tasks: synthetic long-context generators and LongBench loading.

A library package rather than part of the eval CLI so the trainer can draw the
same samples (e.g. NIAH prompts for a quick recall check during fine-tuning).
Nothing here depends on a model: lengths are measured through a caller-supplied
``count_tokens`` and answers are scored from generated text.
"""
