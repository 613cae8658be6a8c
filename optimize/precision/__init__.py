"""Precision stages: each turns the FP32 ONNX into a variant ONNX (FP16 here; INT8 in a later issue)."""
