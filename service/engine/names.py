"""The execution plans' names (``service.engine.plans`` documents each)."""

AUTO = "auto"
STOCK = "onnxruntime"
PLANS = ("onnxruntime", "onnxruntime-single", "native-deform", "amx", "cuda")
