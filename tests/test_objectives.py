"""The objective's dinov2 / iBOT options (Sinkhorn-Knopp, KoLeo, iBOT, registers) inside the training
loop: each option trains and logs its term, their state (iBOT's patch center and mask token, registers)
is checkpointed, and a resumed run with all of them on ends bit-identical to one that never stopped.
(The terms by themselves: tests/test_sinkhorn_koleo_ibot.py.)"""

import json

import pytest
import torch

from dino_train.config import load_config
from dino_train.train import train
from tests.helpers import tiny_overrides

pytestmark = pytest.mark.slow

ALL = [
    "ibot.loss_weight=1.0",
    "dino.koleo_weight=0.1",
    "dino.centering=sinkhorn_knopp",
    "model.num_registers=2",
]


def run(data, out, *extra):
    return train(load_config(None, tiny_overrides(data, out, *extra)))


def logged(out, key):
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if r["kind"] == "step" and key in r]


@pytest.mark.parametrize(
    "extra, term",
    [(["ibot.loss_weight=1.0"], "loss_ibot"), (["ibot.loss_weight=0.5", "ibot.separate_head=true",
      "ibot.out_dim=32"], "loss_ibot"), (["dino.koleo_weight=0.1"], "loss_koleo")],
)  # fmt: skip
def test_each_term_is_optimised_and_logged(tiny_data, tmp_path, extra, term, one_thread):
    out = tmp_path / "r"
    res = run(tiny_data, out, "train.max_steps=3", *extra)
    values = logged(out, term)
    assert len(values) == 3 and all(v == v and v > 0 for v in values)  # finite, positive terms
    # The total is the DINO loss plus the weighted term.
    weight = float(next(e for e in extra if "weight" in e).split("=")[1])
    total, dino = logged(out, "loss")[-1], logged(out, "loss_dino")[-1]
    assert total == pytest.approx(dino + weight * values[-1], rel=1e-5)
    assert res.step == 3


def test_ibot_state_is_checkpointed(tiny_data, tmp_path, one_thread):
    out = tmp_path / "r"
    res = run(tiny_data, out, "train.max_steps=2", "ibot.loss_weight=1.0", "ibot.separate_head=true",
              "ibot.out_dim=32")  # fmt: skip
    ckpt = torch.load(out / "checkpoint.pth", weights_only=True)
    assert ckpt["ibot_loss"]["center"].shape == (1, 32)
    assert not torch.equal(ckpt["ibot_loss"]["center"], torch.zeros(1, 32))  # it moved
    s, t = ckpt["student"], ckpt["teacher"]
    assert "module.mask_token" in s and "mask_token" in t and "patch_head.last_layer.weight_v" in t
    assert not torch.equal(s["module.mask_token"], torch.zeros_like(s["module.mask_token"]))  # trained
    # The teacher's mask token follows the student's by EMA; the backbone export stays the release's.
    assert torch.equal(t["mask_token"], res.teacher.mask_token.detach())
    backbone = torch.load(out / "teacher_backbone.pth", weights_only=True)
    assert "mask_token" not in backbone and not any(k.startswith("patch_head") for k in backbone)


def test_registers_reach_the_backbone_and_eval(tiny_data, tmp_path, one_thread):
    from dino_train.models.loading import load_backbone

    out = tmp_path / "r"
    run(tiny_data, out, "train.max_steps=1", "model.num_registers=3")
    model, info = load_backbone(out / "teacher_backbone.pth")  # the register count is read from the weights
    assert model.num_prefix_tokens == 4 and info["timm_kwargs"]["reg_tokens"] == 3


def test_resume_with_every_option_on_is_bit_identical(tiny_data, tmp_path, one_thread):
    full = run(tiny_data, tmp_path / "full", "train.epochs=1", *ALL)
    assert full.step == 5
    run(tiny_data, tmp_path / "resumed", "train.epochs=1", "train.max_steps=3", *ALL)
    resumed = run(tiny_data, tmp_path / "resumed", "train.epochs=1", *ALL)
    assert resumed.step == 5
    for a, b in ((full.teacher, resumed.teacher), (full.student, resumed.student)):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(x, y), name
    assert logged(tmp_path / "full", "loss_ibot")[-1] == logged(tmp_path / "resumed", "loss_ibot")[-1]
