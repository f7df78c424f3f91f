"""eval_knn: weighted k-NN accuracy of a frozen backbone (the release's protocol)."""
