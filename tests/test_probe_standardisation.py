"""The probes' features and their standardisation (the scorecard's, ``eval_linear --standardize``,
``dino.linear_probe``): the release's token layout, the train split's statistics by hand, the saved probe
on raw features, and the property that makes it worth doing (a dimension's scale no longer decides the
probe)."""

import torch

import dino
from dino_train.models import build_backbone
from eval.linear.model import feature_stats


def test_the_statistics_are_the_train_split_s():
    train = torch.tensor([[1.0, 10.0], [3.0, 30.0], [5.0, 20.0]])
    mean, std = feature_stats(train, eps=0.0)
    # mean (3, 20), unbiased std (2, 10)
    assert torch.allclose(mean, torch.tensor([3.0, 20.0])) and torch.allclose(std, torch.tensor([2.0, 10.0]))
    mean, std = feature_stats(train)
    assert torch.allclose(std, torch.tensor([2.0, 10.0]) + 1e-6)


def _split(g, n):
    # The class lives in dimension 0 (small values); dimension 1 is large noise.
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.stack([0.01 * (2.0 * y - 1.0) + 0.003 * torch.randn(n, generator=g),
                     1000.0 * torch.randn(n, generator=g)], 1)  # fmt: skip
    return x, y


def _probe(tr, ytr, va, yva, standardize):
    return dino.linear_probe(tr, ytr, va, yva, epochs=30, lr=0.3, batch_size=32, standardize=standardize)


def test_a_dimension_s_scale_does_not_decide_the_standardised_probe():
    # Raw, the noise's scale swamps the lr's step on the informative dimension; standardised, both
    # dimensions look alike to the probe, whatever their units.
    g = torch.Generator().manual_seed(0)
    (tr, ytr), (va, yva) = _split(g, 256), _split(g, 256)
    raw = _probe(tr, ytr, va, yva, False).accuracy
    std = _probe(tr, ytr, va, yva, True)
    scale = torch.tensor([1e3, 1e-3])
    rescaled = _probe(tr * scale, ytr, va * scale, yva, True).accuracy
    assert std.accuracy >= 95.0, std.accuracy
    assert abs(std.accuracy - rescaled) <= 1.0, (std.accuracy, rescaled)
    assert raw < 80.0, raw  # what the scorecard measured before it standardised
    # The returned classifier takes raw features: its predictions score what training reported.
    assert std.accuracy == 100.0 * (std.predict(va) == yva).float().mean().item()


def test_probe_features_layout():
    from eval.linear.model import backbone_tokens, variant_features

    torch.manual_seed(0)
    model = build_backbone("vit_tiny", patch_size=8, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = backbone_tokens(model, x, 3)
        torch.testing.assert_close(tokens[:, 2], model(x))  # the last CLS token is the usual feature
    assert tokens.shape == (2, 4, 192)
    assert torch.equal(variant_features(tokens, 2, False), torch.cat([tokens[:, 1], tokens[:, 2]], 1))
    # n=1 with avgpool interleaves CLS and mean patch token, the release's layout for its ViT-B probes.
    interleaved = variant_features(tokens, 1, True)
    assert torch.equal(interleaved[:, 0::2], tokens[:, 2]) and torch.equal(interleaved[:, 1::2], tokens[:, 3])
    assert variant_features(tokens, 3, True).shape == (2, 4 * 192)
