"""Measuring a backbone, shared by training's monitor and the evaluation tools: attention maps and their
Jaccard index against object masks, feature extraction and the patch-token feature store, the k-NN bank
and the release's weighted vote. Import the submodules (``from dino_train.measure import knn``)."""
