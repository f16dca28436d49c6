"""Training: the recipe (`transferkit.train`), its epoch loop, strategies and optimizers, checkpoints and
resume, preemption, regularisers, the LR finder, strategy comparison, TensorBoard logging.
"""
