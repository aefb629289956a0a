"""Trainable adapters on frozen backbones. AA-CLIP lives in `anomaly_core.adapters.aaclip` (re-exported here)."""
from anomaly_core.adapters.aaclip import *  # noqa: F401,F403
from anomaly_core.adapters.aaclip import __all__  # noqa: F401
