"""anomaly_core: zero- and few-shot visual anomaly detection with CLIP-family models, as a DVC pipeline."""

__version__ = "0.1.0"
