"""The k-NN settings every door shares (``eval_knn``, the training monitor and its config defaults,
``dino.``, the demo), each defined once; the values are the original release's (``eval_knn.py``).
Light on purpose (no torch): the config schema takes its defaults from here."""

from __future__ import annotations

KNN_KS: tuple[int, ...] = (10, 20, 100, 200)  # the release's k list; the paper reports k = 20
KNN_TEMPERATURE = 0.07  # votes weighted by exp(cosine similarity / T)
