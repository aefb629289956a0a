"""Scoring maths shared by the methods: patch kNN and coreset (`knn`), map post-processing (`maps`),
zero-shot patch-to-text probabilities (`zero_shot`). The methods themselves are in `anomaly_core/methods/`."""
