"""eval_retrieval: image retrieval on revisited Oxford/Paris style ground truth."""
