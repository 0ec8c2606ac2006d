"""Export: reference PyTorch models -> one validated ONNX graph per component."""
import os

# Never touch a model hub: every model is loaded from a local folder or file.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
