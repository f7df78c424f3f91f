import pytest
import torch
from torch import nn

from dino_train.models import DINOHead, MultiCropWrapper, build_backbone
from dino_train.train.optim import (
    apply_step_values,
    build_optimizer,
    cancel_frozen_grads,
    clip_gradients,
    param_groups,
)


def tiny_model(norm_last_layer=True):
    return MultiCropWrapper(
        build_backbone("vit_tiny", 16, 32),
        DINOHead(192, 10, norm_last_layer=norm_last_layer, hidden_dim=16, bottleneck_dim=8),
    )


def test_param_groups_split_bias_and_1d():
    model = tiny_model(norm_last_layer=False)
    decayed, plain = param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    dn = {names[id(p)] for p in decayed["params"]}
    pn = {names[id(p)] for p in plain["params"]}
    assert plain["weight_decay"] == 0.0
    assert all(
        n.endswith(".bias")
        or n.endswith("norm1.weight")
        or n.endswith("norm2.weight")
        or n == "backbone.norm.weight"
        for n in pn
    )
    # 3-D pos_embed and cls_token and the (K, 1) weight_g are decayed, as in the release.
    assert {
        "backbone.pos_embed",
        "backbone.cls_token",
        "head.last_layer.weight_g",
        "backbone.blocks.0.attn.qkv.weight",
    } <= dn
    assert len(dn) + len(pn) == sum(1 for _ in model.parameters())


def test_frozen_weight_g_in_no_group():
    model = tiny_model(norm_last_layer=True)
    ids = {id(p) for g in param_groups(model) for p in g["params"]}
    assert id(model.head.last_layer.weight_g) not in ids


def test_step_values_only_decay_group_zero():
    opt = build_optimizer(tiny_model(), "adamw")
    apply_step_values(opt, 0.01, 0.3)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.01]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.3, 0.0]


@pytest.mark.parametrize("name", ["adamw", "sgd", "lars"])
def test_optimizers_step(name):
    model = nn.Linear(4, 3)
    opt = build_optimizer(model, name)
    apply_step_values(opt, 0.1, 0.0)
    before = model.weight.detach().clone()
    model(torch.randn(8, 4)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(before, model.weight)


def test_clipping_is_per_parameter():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])  # norms 5 and 0.5
    norms = clip_gradients([a, b], 1.0)
    assert norms.tolist() == pytest.approx([5.0, 0.5])
    assert a.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert b.grad.tolist() == pytest.approx([0.3, 0.4])  # under the limit: untouched
    a.grad = torch.tensor([3.0, 4.0])
    clip_gradients([a], 0.0)  # 0 disables clipping
    assert a.grad.tolist() == [3.0, 4.0]


def test_last_layer_frozen_in_first_epochs_only():
    model = tiny_model(norm_last_layer=False)
    model([torch.randn(2, 3, 32, 32)]).sum().backward()
    cancel_frozen_grads(model, epoch=1, freeze_last_layer=1)
    assert model.head.last_layer.weight_v.grad is not None
    cancel_frozen_grads(model, epoch=0, freeze_last_layer=1)
    assert model.head.last_layer.weight_v.grad is None and model.head.last_layer.weight_g.grad is None
    assert model.head.mlp[0].weight.grad is not None
    # AdamW then leaves the prototypes exactly as they were, weight decay included.
    opt = build_optimizer(model, "adamw")
    apply_step_values(opt, 0.1, 0.5)
    before = model.head.last_layer.weight_v.detach().clone()
    opt.step()
    assert torch.equal(before, model.head.last_layer.weight_v)


def test_adamw_is_fused_where_torch_has_the_kernel_and_equals_foreach(one_thread):
    # The same gradients into both (a model's own would drift apart: its float noise, e.g. the key
    # bias's ~0 gradient, differs once the weights differ by rounding).
    torch.manual_seed(0)
    a, b = tiny_model(), tiny_model()
    b.load_state_dict(a.state_dict())
    before = a.backbone.blocks[0].attn.qkv.weight.detach().clone()
    fused = build_optimizer(a, "adamw")
    assert fused.param_groups[0]["fused"]  # torch has CPU kernels
    foreach = torch.optim.AdamW(param_groups(b), lr=0.0, weight_decay=0.0, foreach=True)
    grads = [[torch.randn_like(p) * 1e-3 for p in a.parameters()] for _ in range(3)]
    for opt, model in ((fused, a), (foreach, b)):
        apply_step_values(opt, 1e-3, 0.04)
        for step in grads:
            for p, g in zip(model.parameters(), step, strict=True):
                p.grad = g.clone() if p.requires_grad else None
            opt.step()
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7, msg=name)
    moved = (a.backbone.blocks[0].attn.qkv.weight - before).abs().max()
    assert 2e-3 < moved < 4e-3  # ~lr per Adam step, 3 steps: the weights did move
