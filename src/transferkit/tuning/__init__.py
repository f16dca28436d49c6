"""Tuning: hyperparameter studies over the training config (Optuna), and ranking backbones by
transferability (LogME) before any training.
"""
