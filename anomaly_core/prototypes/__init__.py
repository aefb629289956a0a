"""Prototype methods on cached CLIP features.

* `multi`: learnable multi-prototype normal / abnormal anchors (method `multi_prototype`), plus the CLIP
  training-data helpers shared with CoOp;
* `image_protos`: CLIP image prototypes (k-shot centroids) for classification and a global anomaly score
  (method `image_prototypes`).
"""
from anomaly_core.prototypes.image_protos import (ImageProtoConfig, centroid, class_centroids, classify,
                                                  classify_rows, fit_class_prototypes, fit_image_prototypes,
                                                  load_image_prototypes, normal_centroid_score,
                                                  save_image_prototypes, score_image_prototypes)
from anomaly_core.prototypes.multi import (MultiProtoConfig, MultiPrototype, load_multi_prototype,
                                           prototype_diagnostics, save_multi_prototype, score_multi_prototype,
                                           train_multi_prototype, usage_range)

__all__ = [
    "MultiProtoConfig", "MultiPrototype", "train_multi_prototype", "score_multi_prototype",
    "prototype_diagnostics", "usage_range", "save_multi_prototype", "load_multi_prototype",
    "ImageProtoConfig", "centroid", "class_centroids", "classify", "normal_centroid_score",
    "fit_image_prototypes", "score_image_prototypes", "fit_class_prototypes", "classify_rows",
    "save_image_prototypes", "load_image_prototypes",
]
