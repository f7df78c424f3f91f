"""eval_linear: a linear probe on frozen features (the release's protocol and variants)."""
