import math

import pytest
import torch
import torch.nn.functional as F

from dino_train.core.centering import batch_center, sinkhorn_knopp, update_center
from dino_train.core.ibot import iBOTPatchLoss
from dino_train.core.loss import DINOLoss


def dino_loss(student, teacher, center, n_crops, student_temp, teacher_temp):
    """The module's loss against a given center (the release's ``dino_loss`` entry loaded into it)."""
    m = DINOLoss(teacher.shape[-1], n_crops, student_temp)
    m.load_state_dict({"center": center})
    return m(student, teacher, teacher_temp)


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


def test_module_center_update_by_hand_with_the_injected_reduction():
    # A second "rank" holds 2 rows that sum to (4, 8, 0): the mean is over all 4 rows.
    m = DINOLoss(
        out_dim=3, n_crops=2, center_momentum=0.75, reduce=lambda t: t + torch.tensor([4.0, 8, 0, 2])
    )
    m.center.copy_(torch.tensor([[4.0, 0.0, -4.0]]))
    m.update_center(torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]))
    # mean = ((4, 4, 4) + (4, 8, 0)) / 4 = (2, 3, 1); 0.75 * center + 0.25 * mean.
    assert m.center[0].tolist() == pytest.approx([3.5, 0.75, -2.75])


def test_module_with_sinkhorn_knopp_uses_its_targets_and_keeps_no_center():
    torch.manual_seed(3)
    student, teacher = torch.randn(3 * 2, 5), torch.randn(2 * 2, 5)
    # One rank, but through the reducer's code path.
    m = DINOLoss(5, 3, 0.1, centering="sinkhorn_knopp", sinkhorn_iterations=4, reduce=lambda t: t * 1.0)
    targets = m.teacher_targets(teacher, 0.07)
    torch.testing.assert_close(targets, sinkhorn_knopp(teacher, 0.07, 4), rtol=0, atol=0)
    log_p = F.log_softmax(student / 0.1, dim=-1).view(3, 2, 5)
    q = targets.view(2, 2, 5)
    pairs = [(t, v) for t in range(2) for v in range(3) if t != v]
    expected = sum(-(q[t] * log_p[v]).sum(-1).mean() for t, v in pairs) / len(pairs)
    assert m(student, teacher, 0.07).total.item() == pytest.approx(expected.item(), rel=1e-6)
    m.update_center(teacher)
    assert torch.equal(m.center, torch.zeros(1, 5)) and list(m.state_dict()) == ["center"]
    with pytest.raises(ValueError, match="centering"):
        DINOLoss(5, 3, centering="sinkhorn")


def test_ibot_module_loss_and_center_by_hand():
    # Two images of 3 patches; image 0 has patches 0 and 2 masked, image 1 patch 1: M = 3 tokens.
    masks = torch.tensor([[True, False, True], [False, True, False]])
    student = torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]])
    m = iBOTPatchLoss(out_dim=2, student_temp=0.5, center_momentum=0.5)
    m.center.copy_(torch.tensor([[1.0, 0.0]]))
    # Teacher temp 0.5 around the center (1, 0): token 0 -> (0, 0) uniform; token 1 -> (-2, 2); token 2
    # -> (2, 4). Student at temp 0.5: (2, 0), (0, 0), (0, 2).
    p1, p2 = torch.softmax(torch.tensor([-2.0, 2.0]), 0), torch.softmax(torch.tensor([2.0, 4.0]), 0)
    ce0 = math.log(1 + math.e**2) - 0.5 * 2  # uniform target against (2, 0)
    ce1 = math.log(2)  # any target against a uniform student
    ce2 = -(p2 * torch.log_softmax(torch.tensor([0.0, 2.0]), 0)).sum().item()
    # Tokens come in the order of x[masks]: image 0's (tokens 0, 1), then image 1's (token 2). Each image
    # weighs 1/2, split over its masked tokens: 1/4 for tokens 0 and 1, 1/2 for token 2.
    expected = (ce0 + ce1) / 4 + ce2 / 2
    assert m(student, teacher, masks, 0.5).item() == pytest.approx(expected, rel=1e-6)
    torch.testing.assert_close(m.teacher_targets(teacher, 0.5)[1], p1)
    # Its own temperature wins over the one given (the DINO schedule's): 0.25 doubles the logits.
    own = iBOTPatchLoss(2, 0.5, teacher_temp=0.25)
    assert own.teacher_targets(teacher, 0.5)[1].tolist() == pytest.approx(
        torch.softmax(torch.tensor([0.0, 4.0]), 0).tolist()
    )
    # Center: 0.5 * (1, 0) + 0.5 * mean token (1, 1) = (1, 0.5).
    m.update_center(teacher)
    assert m.center.tolist() == [[1.0, 0.5]] and list(m.state_dict()) == ["center"]


def test_ibot_module_center_over_ranks_and_sinkhorn_knopp():
    # Another "rank" holds 1 token at (6, 0): the mean is over all 3 tokens, ((2, 2) + (6, 0)) / 3.
    m = iBOTPatchLoss(2, center_momentum=0.0, reduce=lambda t: t + torch.tensor([6.0, 0.0, 1.0]))
    m.update_center(torch.tensor([[1.0, 2.0], [1.0, 0.0]]))
    assert m.center[0].tolist() == pytest.approx([8 / 3, 2 / 3])
    sk = iBOTPatchLoss(2, 0.1, centering="sinkhorn_knopp", sinkhorn_iterations=2)
    teacher = torch.tensor([[1.0, 0.0], [0.0, 3.0], [2.0, 2.0]])
    torch.testing.assert_close(
        sk.teacher_targets(teacher, 0.2), sinkhorn_knopp(teacher, 0.2, 2), rtol=0, atol=0
    )
    sk.update_center(teacher)
    assert torch.equal(sk.center, torch.zeros(1, 2))


@pytest.mark.parametrize("centering", ["center", "sinkhorn_knopp"])
def test_objective_parts_are_the_module_terms(centering):
    from dino_train.config import load_config
    from dino_train.core.koleo import koleo_per_crop
    from dino_train.models.wrapper import CropOutputs
    from dino_train.train.objective import Objective

    cfg = load_config(None, ["data.path=unused", "train.output_dir=unused", "model.out_dim=8",
                             "data.local_crops_number=1", "dino.koleo_weight=0.3", "ibot.loss_weight=0.5",
                             f"dino.centering={centering}"])  # fmt: skip
    obj = Objective(cfg)
    torch.manual_seed(1)
    b, masks = 2, torch.tensor([[True, False, True], [False, False, False], [False, True, True], [True] * 3])
    m = int(masks.sum())
    student = CropOutputs(torch.randn(3 * b, 8), torch.randn(3 * b, 4), torch.randn(m, 8))
    teacher = CropOutputs(torch.randn(2 * b, 8), torch.randn(2 * b, 4), torch.randn(m, 8))
    if centering == "center":  # nonzero centers, so that the parts depend on them
        obj.dino.center.copy_(torch.randn(1, 8))
        obj.ibot.center.copy_(torch.randn(1, 8))
    terms = obj(student, teacher, masks, 0.04)
    dino = obj.dino(student.logits, teacher.logits, 0.04)
    koleo = koleo_per_crop(student.features[: 2 * b], 2)
    ibot = obj.ibot(student.patch_logits, teacher.patch_logits, masks, 0.04)
    assert list(terms.parts) == [
        "loss_dino",
        "loss_global_global",
        "loss_global_local",
        "loss_koleo",
        "loss_ibot",
    ]
    expected = [dino.total, dino.global_global, dino.global_local, koleo, ibot]
    for (name, got), want in zip(terms.parts.items(), expected, strict=True):
        assert torch.equal(got, want), name
    assert torch.equal(terms.total, dino.total + 0.3 * koleo + 0.5 * ibot)
    # update() moves each module's center as its own update_center does on all micro-batches at once.
    twin = Objective(cfg)
    twin.load_state_dict(obj.state_dict())
    before = obj.dino.center.clone(), obj.ibot.center.clone()
    obj.update([teacher, teacher])
    twin.dino.update_center(torch.cat([teacher.logits, teacher.logits]))
    twin.ibot.update_center(torch.cat([teacher.patch_logits, teacher.patch_logits]))
    assert torch.equal(obj.dino.center, twin.dino.center) and torch.equal(obj.ibot.center, twin.ibot.center)
    moved = not torch.equal(obj.dino.center, before[0]) and not torch.equal(obj.ibot.center, before[1])
    assert moved == (centering == "center")
