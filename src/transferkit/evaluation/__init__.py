"""Evaluation: metrics, calibration, a model's pass over a split, `transferkit.evaluate` on a run, the HTML
report.
"""
