"""Data: sources (folders, CSV, builtin sets), splits, image decoding and checks, sampling, transforms,
caches of decoded images, loaders. Above core only.
"""
