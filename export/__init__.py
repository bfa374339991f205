"""Export of trained models to int8 ONNX / ORT / TFLite bundles for device clients."""
