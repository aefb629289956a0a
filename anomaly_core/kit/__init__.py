"""The method-free kit: what several methods share, below them (nothing here imports from `anomaly_core.methods`).

* `scores.py`: the per-category / per-split scoring loop, `Scores`, per-method seeds;
* `patches.py`: patch descriptors of cached features (CNN maps aggregated onto one grid, CLIP tokens);
* `knn.py`: the patch kNN (config, exact blocked search, coreset, IVF / faiss, PatchCore re-weighting, the one
  scoring path `score_patches` that the pipeline and the ONNX export share, the kNN scoring loop);
* `maps.py`: map post-processing (upsampling, Gaussian smoothing, image scores);
* `anchors.py`: patch-to-text scoring against (normal, abnormal) anchors; `prompts.py`: the prompt ensemble;
* `clip_data.py`: CLIP training data (shot tokens, val-anomaly cells); `losses.py`; `prototypes.py`: centroids.
* `tiling.py`: tiles (cut, stitch, per-tile features) for `tiling.enabled` (the tiled kNN).
"""
