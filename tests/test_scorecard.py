"""The scorecard's linear probe on standardised features: the train split's statistics, by hand, and the
property that makes it worth doing (a dimension's scale no longer decides the probe)."""

import torch

from eval.linear_train import train_probe_in_memory
from eval.scorecard import standardize


def test_both_splits_use_the_train_statistics():
    train = torch.tensor([[1.0, 10.0], [3.0, 30.0], [5.0, 20.0]])
    val = torch.tensor([[3.0, 20.0], [7.0, 40.0]])
    a, b = standardize(train, val, eps=0.0)
    # mean (3, 20), unbiased std (2, 10)
    assert torch.allclose(a, torch.tensor([[-1.0, -1.0], [0.0, 1.0], [1.0, 0.0]]))
    assert torch.allclose(b, torch.tensor([[0.0, 0.0], [2.0, 2.0]]))


def _probe(train, labels, val, val_labels):
    _, tracker = train_probe_in_memory(train, labels, val, val_labels, 2, epochs=30, lr=0.3, batch_size=32)
    return tracker.last(0)["top1"]


def test_a_dimension_s_scale_does_not_decide_the_standardised_probe():
    # The class lives in dimension 0 (small values); dimension 1 is large noise. Raw, the noise's scale
    # swamps the lr's step on the informative dimension; standardised, both look alike to the probe.
    g = torch.Generator().manual_seed(0)

    def split(n):
        y = torch.randint(0, 2, (n,), generator=g)
        x = torch.stack([0.01 * (2.0 * y - 1.0) + 0.003 * torch.randn(n, generator=g),
                         1000.0 * torch.randn(n, generator=g)], 1)  # fmt: skip
        return x, y

    (tr, ytr), (va, yva) = split(256), split(256)
    raw = _probe(tr, ytr, va, yva)
    a, b = standardize(tr, va)
    std = _probe(a, ytr, b, yva)
    scale = torch.tensor([1e3, 1e-3])
    a, b = standardize(tr * scale, va * scale)
    std_rescaled = _probe(a, ytr, b, yva)
    assert std >= 95.0, std
    assert abs(std - std_rescaled) <= 1.0, (std, std_rescaled)
    assert raw < 80.0, raw  # what the scorecard measured before it standardised
