"""Precision stages: each turns the FP32 ONNX into a variant ONNX: FP16 (`fp16`: AutoCast or ONNX Runtime's
converter), INT8 (`int8`: ModelOpt or ONNX Runtime Q/DQ, calibrated on the recipe's data) and the INT8 fallback
search that keeps the nodes a gate needs in higher precision (`fallback`)."""
