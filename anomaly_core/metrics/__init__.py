"""Evaluation metrics: anomaly detection (image / pixel level) and classification."""

from anomaly_core.metrics.anomaly import aupro, image_metrics, pixel_metrics, roc_pr_curves
from anomaly_core.metrics.classification import classification_metrics

__all__ = ["aupro", "classification_metrics", "image_metrics", "pixel_metrics", "roc_pr_curves"]
