"""k-NN core: faiss search against brute force, the release's weighted vote, edge cases."""

import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dino_train.measure.knn import faiss_topk, knn_classify, knn_vote

pytestmark = pytest.mark.usefixtures("one_thread")


def _bank(n: int, m: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1), F.normalize(
        torch.randn(m, d, generator=g), dim=1
    )


def test_faiss_topk_equals_brute_force():
    train, queries = _bank(2000, 300, 32)
    sims, idx = faiss_topk(train, queries, k=25, chunk_size=64)  # several chunks
    ref_sims, ref_idx = (queries @ train.T).topk(25, dim=1)
    assert sims.shape == (300, 25) and idx.dtype == torch.int64
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(sims, ref_sims, atol=1e-5, rtol=0)


def test_vote_hand_made_example():
    # One query, three neighbours with labels 1, 0, 1 and similarities 0.9, 0.8, 0.1; T = 0.1.
    sims = torch.tensor([[0.9, 0.8, 0.1]])
    labels = torch.tensor([[1, 0, 1]])
    scores = knn_vote(sims, labels, num_classes=3, temperature=0.1)
    expected = torch.tensor([[math.exp(8.0), math.exp(9.0) + math.exp(1.0), 0.0]])
    torch.testing.assert_close(scores, expected)
    # Two close neighbours of class 0 outvote one slightly closer neighbour of class 1.
    scores = knn_vote(torch.tensor([[0.50, 0.49, 0.48]]), torch.tensor([[1, 0, 0]]), 2, temperature=0.07)
    assert scores.argmax().item() == 0


def test_k_capped_at_bank_size_with_warning():
    train, queries = _bank(7, 3, 16)
    with pytest.warns(UserWarning, match="using k=7"):
        sims, idx = faiss_topk(train, queries, k=50)
    assert sims.shape == (3, 7)
    assert sorted(idx[0].tolist()) == list(range(7))

    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    test_labels = torch.tensor([0, 1, 2])
    with pytest.warns(UserWarning, match="exceed the 7 training images"):
        res = knn_classify(train, labels, queries, test_labels, num_classes=3, ks=(3, 50))
    assert set(res) == {3, 50}
    full = knn_classify(train, labels, queries, test_labels, num_classes=3, ks=(7,))
    assert res[50] == full[7]


def test_one_test_image_and_few_classes():
    # Class c sits around the c-th axis; the query is next to class 2.
    g = torch.Generator().manual_seed(1)
    centres = torch.eye(3, 8)
    train = torch.cat([centres[c] + 0.05 * torch.randn(10, 8, generator=g) for c in range(3)])
    labels = torch.arange(3).repeat_interleave(10)
    query = (centres[2] + 0.01 * torch.randn(8, generator=g)).unsqueeze(0)
    res = knn_classify(train, labels, query, torch.tensor([2]), num_classes=3, ks=(1, 5, 20))
    assert res == {1: (100.0, 100.0), 5: (100.0, 100.0), 20: (100.0, 100.0)}  # top-5 = top-3 here
    wrong = knn_classify(train, labels, query, torch.tensor([0]), num_classes=3, ks=(5,))
    assert wrong[5][0] == 0.0 and wrong[5][1] == 100.0


def test_accuracy_on_separable_clusters_matches_brute_force_vote():
    train, queries = _bank(500, 100, 16, seed=3)
    labels = torch.randint(0, 7, (500,), generator=torch.Generator().manual_seed(0))
    test_labels = torch.randint(0, 7, (100,), generator=torch.Generator().manual_seed(1))
    res = knn_classify(train, labels, queries, test_labels, num_classes=7, ks=(10,))
    sims, idx = (queries @ train.T).topk(10, dim=1)
    onehot = F.one_hot(labels[idx], 7).float() * (sims / 0.07).exp().unsqueeze(-1)
    top1 = 100.0 * (onehot.sum(1).argmax(1) == test_labels).float().mean().item()
    assert res[10][0] == pytest.approx(top1)


def test_val_classes_missing_from_train_are_reported(tmp_path):
    from dino_train.measure.knn_bank import evaluate_knn
    from dino_train.models import build_backbone

    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    for split, names in (("train", ["red", "green"]), ("val", ["red", "green", "blue"])):
        for name in names:
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (16, 16), tuple(c + 5 * i for c in colours[name])).save(
                    tmp_path / split / name / f"{i}.png"
                )
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", patch_size=8, img_size=16)
    with pytest.warns(UserWarning, match="blue"):
        res = evaluate_knn(backbone, tmp_path / "train", tmp_path / "val", ks=(1, 3), resize=16, crop=16)
    assert set(res) == {1, 3}
    # The three blue val images can never be right: at most 6 of 9 correct.
    assert all(0.0 <= t1 <= 100.0 * 6 / 9 + 1e-9 for t1, _ in res.values())
