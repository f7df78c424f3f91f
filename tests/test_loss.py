import math

import pytest
import torch
import torch.nn.functional as F

from dino_train.core.centering import batch_center, update_center
from dino_train.core.loss import DINOLoss, dino_loss


def reference_loss(student, teacher, center, n_crops, st, tt):
    """The release's loop, written out pair by pair."""
    s = (student / st).chunk(n_crops)
    t = F.softmax((teacher - center) / tt, dim=-1).chunk(2)
    total, n = 0.0, 0
    for iq, q in enumerate(t):
        for v in range(n_crops):
            if v == iq:
                continue
            total += torch.sum(-q * F.log_softmax(s[v], dim=-1), dim=-1).mean()
            n += 1
    return total / n


def test_loss_by_hand_two_crops():
    # B=1, K=2, two global crops only: loss = mean of CE(t1, s2) and CE(t2, s1).
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    center = torch.zeros(1, 2)
    q1 = torch.softmax(torch.tensor([2.0, 0.0]) / 0.5, 0)
    q2 = torch.tensor([0.5, 0.5])
    lp1 = torch.log_softmax(torch.tensor([1.0, 0.0]) / 0.1, 0)
    lp2 = torch.log_softmax(torch.tensor([0.0, 1.0]) / 0.1, 0)
    expected = (-(q1 * lp2).sum() - (q2 * lp1).sum()) / 2
    got = dino_loss(student, teacher, center, n_crops=2, student_temp=0.1, teacher_temp=0.5)
    assert got.total.item() == pytest.approx(expected.item(), rel=1e-6)
    assert math.isnan(got.global_local.item())


def test_loss_matches_pairwise_reference_with_locals():
    torch.manual_seed(0)
    b, k, n_crops = 3, 7, 6
    student, teacher, center = torch.randn(n_crops * b, k), torch.randn(2 * b, k), torch.randn(1, k)
    got = dino_loss(student, teacher, center, n_crops, 0.1, 0.04)
    ref = reference_loss(student, teacher, center, n_crops, 0.1, 0.04)
    assert got.total.item() == pytest.approx(ref.item(), rel=1e-5)
    # The split terms recombine to the total: 2 global-global pairs and 2*(n_crops-2) global-local ones.
    recombined = (2 * got.global_global + 2 * (n_crops - 2) * got.global_local) / (2 * (n_crops - 1))
    assert recombined.item() == pytest.approx(got.total.item(), rel=1e-5)


def test_uniform_outputs_give_log_k():
    k = 16
    got = dino_loss(torch.zeros(4 * 2, k), torch.zeros(2 * 2, k), torch.zeros(1, k), 4, 0.1, 0.04)
    assert got.total.item() == pytest.approx(math.log(k), rel=1e-6)


def test_loss_gradient_only_reaches_student():
    student = torch.randn(8, 5, requires_grad=True)
    teacher = torch.randn(4, 5, requires_grad=True)
    dino_loss(student, teacher, torch.zeros(1, 5), 4, 0.1, 0.04).total.backward()
    assert student.grad is not None and teacher.grad is None


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="n_crops"):
        dino_loss(torch.zeros(6, 3), torch.zeros(4, 3), torch.zeros(1, 3), 4, 0.1, 0.04)


def test_center_update_by_hand():
    teacher = torch.tensor([[1.0, 3.0], [3.0, 5.0]])
    mean = batch_center(teacher)
    assert mean.tolist() == [[2.0, 4.0]]
    new = update_center(torch.tensor([[10.0, 0.0]]), mean, momentum=0.9)
    assert new[0].tolist() == pytest.approx([9.2, 0.4])


def test_center_reduction_is_injected_and_weighted_by_rows():
    # Two "ranks" with 2 and 4 rows: the center is the mean over all 6 rows.
    a, b = torch.ones(2, 3), torch.full((4, 3), 4.0)
    other = torch.cat([b.sum(0), torch.tensor([4.0])])
    mean = batch_center(a, lambda t: t + other)
    assert mean.shape == (1, 3) and mean[0].tolist() == pytest.approx([3.0, 3.0, 3.0])


def test_module_updates_center_after_the_loss():
    m = DINOLoss(out_dim=3, n_crops=2, center_momentum=0.5)
    teacher = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    before = m(torch.zeros(2, 3), teacher, 0.04).total
    m.update_center(teacher)
    assert m.center[0].tolist() == pytest.approx([0.5, 0.0, 0.5])
    assert list(m.state_dict()) == ["center"]
    assert torch.isfinite(before)
