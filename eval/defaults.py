"""The evaluation settings every door shares (``eval_knn``, the training monitor, ``dino.``, the demo):
each defined here once. Values are the original release's (``eval_knn.py``, ``eval_linear.py``)."""

from __future__ import annotations

KNN_KS: tuple[int, ...] = (10, 20, 100, 200)  # the release's k list; the paper reports k = 20
KNN_TEMPERATURE = 0.07  # votes weighted by exp(cosine similarity / T)
RESIZE_RATIO = 256 / 224  # Resize(256) then CenterCrop(224): the short side is resized to crop * 256 / 224


def resize_for(crop: int) -> int:
    """The short side to resize to before a centre crop of ``crop`` pixels, as the release (256 for 224)."""
    return round(crop * RESIZE_RATIO)
