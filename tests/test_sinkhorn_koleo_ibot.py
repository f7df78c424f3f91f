"""The objective's dinov2 / iBOT terms by themselves: Sinkhorn-Knopp targets, KoLeo, the iBOT patch loss
and its center. Hand-computed values, and two gloo processes against one process on
the joined batch. (The masks: tests/test_ibot_masks.py; the same options inside the training loop:
tests/test_objectives.py.)"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dino_train.core.centering import sinkhorn_knopp
from dino_train.core.ibot import (
    ibot_patch_loss,
    masked_token_weights,
    patch_center_update,
    teacher_patch_targets,
)
from dino_train.core.koleo import koleo_loss, koleo_per_crop
from dino_train.runtime.distributed import free_port
from tests.helpers import fork_ranks

# ---------------------------------------------------------------- Sinkhorn-Knopp


def sk_reference(logits: torch.Tensor, temp: float, n_iterations: int) -> torch.Tensor:
    """dinov2's algorithm written out element by element in float64: Q is (K, R)."""
    q = torch.exp(logits.double() / temp).T.clone()
    k, r = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        for i in range(k):
            q[i] /= q[i].sum() * k
        for j in range(r):
            q[:, j] /= q[:, j].sum() * r
    return (q * r).T


def test_sinkhorn_matches_the_elementwise_reference():
    torch.manual_seed(0)
    logits = torch.randn(4, 3)
    got = sinkhorn_knopp(logits, teacher_temp=0.1, n_iterations=3)
    assert got.dtype == torch.float32 and got.shape == (4, 3)
    torch.testing.assert_close(got.double(), sk_reference(logits, 0.1, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(4), atol=1e-6, rtol=0)


def test_sinkhorn_of_a_balanced_input_is_the_softmax_and_removes_a_prototype_bias():
    # A circulant matrix is balanced by construction: every prototype already gets 1/K of the mass.
    k, temp = 5, 0.1
    base = torch.tensor([1.0, 0.2, -0.5, 0.3, 0.0])
    logits = torch.stack([base.roll(r) for r in range(k)])
    got = sinkhorn_knopp(logits, temp)
    torch.testing.assert_close(got, torch.softmax(logits / temp, dim=1), atol=1e-6, rtol=0)
    torch.testing.assert_close(got.mean(dim=0), torch.full((k,), 1 / k), atol=1e-6, rtol=0)
    # A bias towards some prototypes, the same for every sample, is what collapse looks like: SK undoes it.
    biased = sinkhorn_knopp(logits + torch.tensor([3.0, 0.0, 0.0, -1.0, 0.5]), temp)
    torch.testing.assert_close(biased, got, atol=1e-5, rtol=0)


def test_sinkhorn_spreads_an_unbalanced_batch_over_the_prototypes():
    torch.manual_seed(1)
    logits = torch.randn(64, 8) * 0.3 + torch.linspace(0, 1, 8)  # softmax would favour the last prototypes
    assert torch.softmax(logits / 0.1, dim=1).mean(0).max() > 0.3
    got = sinkhorn_knopp(logits, 0.1, n_iterations=30)
    torch.testing.assert_close(got.mean(dim=0), torch.full((8,), 1 / 8), atol=1e-4, rtol=0)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(64), atol=1e-5, rtol=0)


def test_sinkhorn_stays_finite_for_huge_logits():
    torch.manual_seed(2)
    logits = torch.randn(6, 5) * 1e4  # /0.04: exp of 2.5e5 overflows even float64
    got = sinkhorn_knopp(logits, 0.04)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.sum(dim=1), torch.ones(6), atol=1e-5, rtol=0)
    # A sample far below the others everywhere still gets a distribution (the naive form gives 0/0).
    far = torch.tensor([[1e4, 1e4, 1e4], [0.0, 1.0, 0.0]])
    assert torch.isfinite(sinkhorn_knopp(far, 0.04)).all()
    with pytest.raises(ValueError, match="n_iterations"):
        sinkhorn_knopp(logits, 0.04, n_iterations=0)


# ---------------------------------------------------------------- KoLeo


def test_koleo_by_hand_on_three_points():
    # Directions 0, 90 and 135 degrees (lengths differ: the features are normalised first).
    # Nearest neighbours: 1 -> 2 at sqrt(2), 2 -> 3 and 3 -> 2 at 2 sin(pi/8) = sqrt(2 - sqrt(2)).
    x = torch.tensor([[3.0, 0.0], [0.0, 0.5], [-2.0, 2.0]])
    expected = -(0.5 * math.log(2) + 2 * 0.5 * math.log(2 - math.sqrt(2))) / 3
    assert koleo_loss(x).item() == pytest.approx(expected, rel=1e-6)


def test_koleo_gradient_pushes_nearest_neighbours_apart():
    torch.manual_seed(3)
    x = torch.randn(8, 3, requires_grad=True)

    def min_distance(f: torch.Tensor) -> float:
        u = torch.nn.functional.normalize(f.detach(), dim=-1)
        d = torch.cdist(u, u) + torch.eye(len(u)) * 10
        return d.min().item()

    koleo_loss(x).backward()
    assert min_distance(x - 0.01 * x.grad) > min_distance(x)


def test_koleo_of_identical_points_is_large_but_finite():
    x = torch.ones(4, 3, requires_grad=True)
    loss = koleo_loss(x, eps=1e-8)
    assert loss.item() == pytest.approx(-math.log(1e-8), rel=1e-4)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ValueError, match="N >= 2"):
        koleo_loss(torch.ones(1, 3))


def test_koleo_is_taken_per_global_crop():
    torch.manual_seed(4)
    g1 = torch.randn(5, 4)
    g2 = g1 + 1e-4 * torch.randn(5, 4)  # the second view of each image sits next to the first
    both = torch.cat([g1, g2])
    per_crop = koleo_per_crop(both, n_global=2)
    assert per_crop.item() == pytest.approx(((koleo_loss(g1) + koleo_loss(g2)) / 2).item(), rel=1e-6)
    assert koleo_loss(both).item() > per_crop.item() + 5  # pooled, each point's neighbour is its twin
    with pytest.raises(ValueError, match="multiple"):
        koleo_per_crop(torch.randn(5, 4), n_global=2)


# ---------------------------------------------------------------- iBOT patch loss


def _ibot_example(requires_grad: bool = True):
    """B=2, N=3, K=2; image 0 masked at patches 0 and 2, image 1 not masked."""
    student = torch.tensor(
        [[[1.0, 0.0], [5.0, -3.0], [0.0, 0.0]], [[2.0, 1.0], [0.0, 4.0], [-1.0, 1.0]]],
        requires_grad=requires_grad,
    )
    teacher = torch.tensor([[[0.25, 0.75], [0.9, 0.1], [0.6, 0.4]], [[0.5, 0.5], [0.2, 0.8], [0.7, 0.3]]])
    masks = torch.tensor([[True, False, True], [False, False, False]])
    return student, teacher, masks


def test_ibot_loss_by_hand():
    student, teacher, masks = _ibot_example()
    # student_temp 0.5: patch 0 -> logits (2, 0), CE = log(1 + e^2) - 0.25 * 2; patch 2 -> (0, 0), CE = ln 2.
    expected = (math.log(1 + math.e**2) - 0.5 + math.log(2)) / 2
    got = ibot_patch_loss(student, teacher, masks, student_temp=0.5)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # The released iBOT / dinov2 code divides by every image of the batch: half here.
    all_images = ibot_patch_loss(student, teacher, masks, student_temp=0.5, mean_over="all_images")
    assert all_images.item() == pytest.approx(expected / 2, rel=1e-6)


def test_ibot_unmasked_patches_neither_count_nor_get_gradient():
    student, teacher, masks = _ibot_example()
    base = ibot_patch_loss(student, teacher, masks, 0.5)
    base.backward()
    assert (student.grad[~masks] == 0).all() and (student.grad[masks] != 0).any()
    other_student = student.detach().clone()
    other_student[~masks] = torch.randn(int((~masks).sum()), 2) * 100
    other_teacher = teacher.clone()
    other_teacher[~masks] = torch.tensor([1.0, 0.0])
    assert ibot_patch_loss(other_student, other_teacher, masks, 0.5).item() == pytest.approx(base.item())


def test_ibot_weights_each_image_equally_whatever_its_mask_count():
    masks = torch.tensor([[True, True, True, False], [False, True, False, False], [False] * 4])
    weights = masked_token_weights(masks)
    assert weights.tolist() == pytest.approx([1 / 6, 1 / 6, 1 / 6, 1 / 2])
    assert masked_token_weights(masks, "all_images").sum().item() == pytest.approx(2 / 3)


def test_ibot_without_any_mask_is_zero_and_backward_works():
    student, teacher, _ = _ibot_example()
    loss = ibot_patch_loss(student, teacher, torch.zeros(2, 3, dtype=torch.bool), 0.5)
    assert loss.item() == 0.0
    loss.backward()
    assert student.grad is not None and (student.grad == 0).all()


def test_teacher_patch_targets_are_centred_sharpened_probabilities():
    logits = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]], requires_grad=True)
    got = teacher_patch_targets(logits, torch.tensor([[1.0, 0.0]]), teacher_temp=0.5)
    assert not got.requires_grad and got.shape == (1, 2, 2)
    assert got[0, 0].tolist() == pytest.approx([0.5, 0.5])
    assert got[0, 1, 1].item() == pytest.approx(1 / (1 + math.exp(-6)))


def test_patch_center_update_by_hand():
    torch.manual_seed(5)
    center, logits = torch.randn(1, 4), torch.randn(2, 3, 4)
    got = patch_center_update(center, logits, momentum=0.9)
    expected = 0.9 * center + 0.1 * logits.reshape(-1, 4).mean(0, keepdim=True)
    assert got.shape == (1, 4)
    torch.testing.assert_close(got, expected)
    # Another "rank" with 4 images of 3 patches all at 2: the mean is over all 18 tokens.
    other = torch.cat([torch.full((4,), 2.0 * 12), torch.tensor([12.0])])
    got2 = patch_center_update(torch.zeros(1, 4), logits, 0.0, lambda t: t + other)
    torch.testing.assert_close(got2, (logits.reshape(-1, 4).sum(0, keepdim=True) + 24) / 18)


# ---------------------------------------------------------------- two gloo processes


def _dist_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(6)
    return {
        "sk": torch.randn(10, 6, generator=g),
        # Large logits: the two ranks' sums differ by far more than float64's exponent range.
        "sk_large": torch.randn(10, 6, generator=g) * 30 + torch.arange(10).unsqueeze(1) * 10,
        "patch": torch.randn(5, 3, 4, generator=g),
        "center": torch.randn(1, 4, generator=g),
    }


SK_SPLIT = {0: slice(0, 5), 1: slice(5, 10)}  # halves
SK_LARGE_SPLIT = {0: slice(0, 3), 1: slice(3, 10)}  # unequal
PATCH_SPLIT = {0: slice(0, 2), 1: slice(2, 5)}  # unequal batch sizes


def _sum(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t)
    return t


def _dist_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        x = _dist_inputs()
        result = {
            "sk": sinkhorn_knopp(x["sk"][SK_SPLIT[rank]], 0.1, all_reduce_sum=_sum),
            "sk_large": sinkhorn_knopp(x["sk_large"][SK_LARGE_SPLIT[rank]], 0.04, all_reduce_sum=_sum),
            "center": patch_center_update(x["center"], x["patch"][PATCH_SPLIT[rank]], 0.9, _sum),
        }
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[int, dict[str, torch.Tensor]]:
    out = tmp_path_factory.mktemp("ranks")
    fork_ranks(_dist_worker, free_port(), str(out))
    return {r: torch.load(out / f"rank{r}.pt") for r in (0, 1)}


@pytest.mark.dist
@pytest.mark.parametrize("name, split, temp", [("sk", SK_SPLIT, 0.1), ("sk_large", SK_LARGE_SPLIT, 0.04)])
def test_sinkhorn_on_two_ranks_equals_one_process_on_the_joined_batch(two_ranks, name, split, temp):
    joined = sinkhorn_knopp(_dist_inputs()[name], temp)
    assert torch.isfinite(joined).all()
    for rank in (0, 1):
        torch.testing.assert_close(two_ranks[rank][name], joined[split[rank]], atol=1e-6, rtol=0)


@pytest.mark.dist
def test_patch_center_on_two_ranks_equals_one_process_on_the_joined_batch(two_ranks):
    x = _dist_inputs()
    joined = patch_center_update(x["center"], x["patch"], 0.9)
    for rank in (0, 1):
        torch.testing.assert_close(two_ranks[rank]["center"], joined, atol=1e-6, rtol=0)
