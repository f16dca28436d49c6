"""Bottom layer: errors, the run config, progress display, the machine (device, cores, seeds), processes
(torchrun groups), crash-safe files. Imports nothing else of transferkit.
"""
