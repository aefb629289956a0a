"""AA-CLIP (anomaly-aware CLIP adapters): the public API in one import (tests, notebooks).

Implementation: `modules` (adapters), `core` (configs, anchors, maps, losses, scoring), `training`
(stages 1 and 2), `checkpoints` (save / load with architecture checks).
"""
from anomaly_core.methods.aaclip.checkpoints import (
    load_image_adapters,
    load_text_adapters,
    save_image_adapters,
    save_text_adapters,
)
from anomaly_core.methods.aaclip.core import (
    LOGIT_SCALE,
    ImageAdapterConfig,
    TextAdapterConfig,
    check_image_size,
    class_anchors,
    det_probability,
    encode_images,
    encode_prompts,
    image_stage_loss,
    score_images,
    similarity_map,
    stack_anchors,
    test_map,
    text_stage_loss,
)
from anomaly_core.methods.aaclip.modules import ImageAdapters, SimpleAdapter, SimpleProj, TextAdapters, mix_adapted
from anomaly_core.methods.aaclip.training import (
    augment_batch,
    evaluate_image_adapters,
    train_image_adapters,
    train_text_adapters,
)

__all__ = [
    "LOGIT_SCALE", "ImageAdapterConfig", "TextAdapterConfig", "SimpleAdapter", "SimpleProj", "TextAdapters",
    "ImageAdapters", "mix_adapted", "class_anchors", "encode_prompts", "stack_anchors", "similarity_map", "test_map",
    "text_stage_loss", "image_stage_loss", "encode_images", "det_probability", "score_images", "check_image_size",
    "train_text_adapters", "train_image_adapters", "augment_batch", "evaluate_image_adapters",
    "save_text_adapters", "load_text_adapters", "save_image_adapters", "load_image_adapters",
]
