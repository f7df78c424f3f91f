import torch

from dino_train.core.ema import ema_update_


def test_momentum_one_keeps_teacher_and_zero_copies_student():
    t = [torch.randn(3, 4), torch.randn(5)]
    s = [torch.randn(3, 4), torch.randn(5)]
    before = [x.clone() for x in t]
    ema_update_(t, s, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(t, before, strict=True))
    ema_update_(t, s, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(t, s, strict=True))


def test_ema_by_hand():
    t, s = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, 6.0])]
    ema_update_(t, s, 0.75)
    assert t[0].tolist() == [1.5, 3.0]
    assert s[0].tolist() == [3.0, 6.0]


def test_ema_equals_the_product_form_within_float_rounding():
    # ema_update_ is one lerp: t + (1 - m)(s - t); the release writes m t + (1 - m) s.
    g = torch.Generator().manual_seed(0)
    t = [torch.randn(1000, generator=g), torch.randn(7, 9, generator=g)]
    s = [torch.randn(1000, generator=g), torch.randn(7, 9, generator=g)]
    for m in (0.996, 0.9, 0.5):
        expected = [m * a.double() + (1 - m) * b.double() for a, b in zip(t, s, strict=True)]
        got = [a.clone() for a in t]
        ema_update_(got, s, m)
        for x, y in zip(got, expected, strict=True):
            torch.testing.assert_close(x.double(), y, rtol=0, atol=1e-6)
