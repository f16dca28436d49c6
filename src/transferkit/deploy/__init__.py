"""Deploy: bundles (safetensors + model.json), the Predictor that `transferkit.load` returns, ONNX and
TorchScript export with parity checks.
"""
