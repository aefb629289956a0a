"""Using a trained experiment: thresholds chosen on val (`thresholds`), the exported model bundle (`bundle`),
scoring new images with it (`predict`) and its ONNX form (`onnx`)."""
