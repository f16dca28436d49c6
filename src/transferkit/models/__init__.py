"""Models: weights (bundled, cached, local files), backbone + head, BatchNorm folding, cached backbone
features, and how a model runs on the machine (Runtime: device, precision, memory format).
"""
