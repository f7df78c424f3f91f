"""Image retrieval and copy detection: the gnd reader (which
must never run code), name-based truth, whitening, and eval_retrieval end to end on generated copies."""

import json
import pickle
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageFilter

from dino_train.models import build_backbone
from dino_train.runtime.files import with_prefix
from eval.retrieval import cli as retrieval_eval
from eval.retrieval.features import cls_gem_descriptor, gem, multiscale
from eval.retrieval.gnd import GroundTruthError, find_named, name_truths, read_gnd
from eval.retrieval.whitening import learn_whitening

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------------------- AP maths


# ------------------------------------------------------------------------------------ ground truth


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/h18b-should-never-exist",))


def _gnd():
    return {
        "imlist": ["a", "b", "c"],
        "qimlist": ["q"],
        "gnd": [{"easy": np.array([0]), "hard": np.array([1, 2]), "junk": [], "bbx": [0.0, 0.0, 5.0, 5.0]}],
    }


def test_gnd_pickle_with_numpy_arrays_loads_and_json_is_the_same(tmp_path):
    (tmp_path / "gnd.pkl").write_bytes(pickle.dumps(_gnd()))
    from_pickle = read_gnd(tmp_path / "gnd.pkl")
    as_json = _gnd() | {"gnd": [{"easy": [0], "hard": [1, 2], "junk": []}]}
    (tmp_path / "gnd.json").write_text(json.dumps(as_json))
    from_json = read_gnd(tmp_path / "gnd.json")
    assert from_pickle["imlist"] == from_json["imlist"] == ["a", "b", "c"]
    for key in ("easy", "hard", "junk"):
        assert from_pickle["gnd"][0][key].tolist() == from_json["gnd"][0][key].tolist()


def test_gnd_pickle_that_would_run_code_is_refused(tmp_path):
    bad = tmp_path / "gnd.pkl"
    bad.write_bytes(pickle.dumps(_gnd() | {"x": _Evil()}))
    with pytest.raises(
        GroundTruthError, match=r"gnd.pkl is not a readable gnd file: refused global posix.system"
    ):
        read_gnd(bad)
    assert not Path("/tmp/h18b-should-never-exist").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"imlist": ["a"], "qimlist": ["q"]}, "'gnd' must be a list with one entry per query"),
        ({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"ok": [3]}]}, r"gnd\[0\]\['ok'\] has an index outside"),
        ({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"pos": [0]}]}, "needs keys easy/hard/junk"),
        ([1, 2], "holds a list, not a dict"),
    ],
)
def test_bad_gnd_files_name_the_key(tmp_path, content, message):
    (tmp_path / "gnd.json").write_text(json.dumps(content))
    with pytest.raises(GroundTruthError, match=message):
        read_gnd(tmp_path / "gnd.json")


def test_name_truth_pairs_copies_with_originals(tmp_path):
    gallery = [Path(f"g/{n}.png") for n in ("00042", "000421", "00007")]
    queries = [Path(f"q/{n}.jpg") for n in ("00042_crop", "00042-jpeg30", "000421", "00099_blur", "00007")]
    assert [t.positives.tolist() for t in name_truths(queries, gallery)] == [[0], [0], [1], [], [2]]
    # Copydays' strong block: the first four characters name the original.
    copydays = [Path("200000.jpg"), Path("200100.jpg"), Path("200050.jpg")]
    found = name_truths([Path("200003.jpg"), Path("200102.jpg")], copydays, prefix=4)
    assert [t.positives.tolist() for t in found] == [[0, 2], [1]]
    (tmp_path / "jpg").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "jpg" / "all_souls_1.jpg")
    assert find_named(tmp_path, ["all_souls_1"], "--gallery") == [tmp_path / "jpg" / "all_souls_1.jpg"]
    with pytest.raises(GroundTruthError, match="image 'radcliffe_2' of the gnd file is not in"):
        find_named(tmp_path, ["radcliffe_2"], "--gallery")


# --------------------------------------------------------------------------------- descriptors


def test_gem_and_whitening_maths():
    tokens = torch.tensor([[[1.0, -2.0], [3.0, 0.0]]])
    expected = torch.tensor([[((1 + 81) / 2) ** 0.25, ((2e-6**4) / 2) ** 0.25]])
    torch.testing.assert_close(gem(tokens), expected)
    g = torch.Generator().manual_seed(0)  # both factors seeded: whatever ran before, the same data
    x = torch.randn(500, 6, generator=g) @ torch.randn(6, 6, generator=g) + 3.0
    w = learn_whitening(x, centred=True)
    y = w.apply(x)
    torch.testing.assert_close(y.T @ y / len(y), torch.eye(6), atol=1e-4, rtol=0)
    assert w.energy_kept == pytest.approx(1.0) and learn_whitening(x, dim=2).projection.shape == (2, 6)
    # The release's variant (uncentred second moment) differs from the covariance whitening.
    assert not torch.allclose(learn_whitening(x).projection, w.projection)


def test_cls_gem_descriptor_and_multiscale_shapes():
    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", patch_size=8, img_size=32).eval()
    x = torch.randn(2, 3, 37, 45)  # cropped to 32 x 40 inside
    with torch.no_grad():
        d = cls_gem_descriptor(vit, x)
        ms = multiscale(cls_gem_descriptor)(vit, x)
    assert d.shape == (2, 384)
    torch.testing.assert_close(d[:, :192], vit(x[..., :32, :40]))
    torch.testing.assert_close(ms.norm(dim=1), torch.ones(2))


# ----------------------------------------------------------------------------------- end to end


def _edit(img: Image.Image, kind: int, rng: np.random.Generator) -> Image.Image:
    """An edited copy: a crop, JPEG re-encoding, a colour change or a blur (Copydays-style edits)."""
    w, h = img.size
    if kind == 0:
        s = rng.uniform(0.7, 0.85)
        x, y = rng.integers(0, int(w * (1 - s)) + 1), rng.integers(0, int(h * (1 - s)) + 1)
        return img.crop((x, y, x + int(w * s), y + int(h * s)))
    if kind == 1:
        buf = BytesIO()
        img.save(buf, format="JPEG", quality=15)
        return Image.open(BytesIO(buf.getvalue())).convert("RGB")
    if kind == 2:
        return ImageEnhance.Color(ImageEnhance.Brightness(img).enhance(1.3)).enhance(0.4)
    return img.filter(ImageFilter.GaussianBlur(1.2))


@pytest.fixture(scope="module")
def copies(tmp_path_factory) -> Path:
    """gallery/: 40 embedded images; query/<edit>/: edited copies of 12 of them (3 per edit);
    distractors/ and whiten/: other embedded images."""
    from dino_train.data import generate_embedded_dataset

    data = generate_embedded_dataset(
        tmp_path_factory.mktemp("emb") / "e", 64, train_per_class=6, val_per_class=2, version=1
    )
    root = tmp_path_factory.mktemp("copies")
    rng = np.random.default_rng(0)
    train = sorted((data / "train").rglob("*.png"))
    for i, p in enumerate(train):
        folder = ("gallery", "gallery", "gallery", "gallery", "whiten", "distractors")[i % 6]
        (root / folder).mkdir(exist_ok=True)
        Image.open(p).save(root / folder / f"{p.parent.name}{p.stem}.png")
    originals = sorted((root / "gallery").iterdir())
    for i, p in enumerate(originals[::3][:12]):
        kind = i % 4
        folder = root / "query" / ("crops", "jpeg", "colour", "blur")[kind]
        folder.mkdir(parents=True, exist_ok=True)
        _edit(Image.open(p).convert("RGB"), kind, rng).save(folder / f"{p.stem}_copy.jpg", quality=95)
    return root


def _release_checkpoint(path: Path) -> Path:
    """A release-format full checkpoint (teacher/student with prefixes, pickled args) of a random ViT."""
    import argparse

    torch.manual_seed(0)
    vit = build_backbone("vit_tiny", patch_size=8, img_size=32)
    sd = vit.state_dict()
    head = {"head.last_layer.weight_g": torch.ones(8, 1)}
    args = argparse.Namespace(arch="vit_tiny", patch_size=8)
    ckpt = {"teacher": with_prefix(sd, "backbone.") | head, "student": with_prefix(sd, "module.backbone.")}
    torch.save(ckpt | {"epoch": 100, "args": args}, path)
    return path


@pytest.mark.slow
def test_eval_retrieval_finds_the_originals_of_edited_copies(copies, backbone_file, tmp_path, capsys):
    out = tmp_path / "plain"
    args = ["--checkpoint", str(backbone_file), "--query", str(copies / "query"), "--no-progress"]
    retrieval_eval.main(
        [*args, "--gallery", str(copies / "gallery"), "--output-dir", str(out), "--num-workers", "0"]
    )
    res = json.loads((out / "retrieval_results.json").read_text())
    # 12 queries, one original each among 40: a random ranking scores about H(40)/40 = 0.11.
    assert res["num_queries"] == 12 and res["num_gallery"] == 40 and res["overall"]["num_evaluated"] == 12
    assert res["overall"]["map"] > 0.6, res["overall"]
    assert set(res["blocks"]) == {"crops", "jpeg", "colour", "blur"}
    s = res["settings"]
    expected = {"protocol": "plain", "imsize": 224, "resize_mode": "thumbnail", "topk": 0}
    assert {k: s[k] for k in expected} == expected and s["descriptor"] == "cls"
    assert res["backbone"]["arch"] == "vit_tiny" and len(res["queries"]) == 12 and "ap" in res["queries"][0]
    assert "mAP" in capsys.readouterr().out


@pytest.mark.slow
def test_copydays_protocol_with_whitening_distractors_and_a_release_checkpoint(copies, tmp_path):
    ckpt = _release_checkpoint(tmp_path / "checkpoint.pth")
    out = tmp_path / "copydays"
    retrieval_eval.main(
        ["--checkpoint", str(ckpt), "--protocol", "copydays", "--query", str(copies / "query"),
         "--gallery", str(copies / "gallery"), "--distractors", str(copies / "distractors"),
         "--whitening-data", str(copies / "whiten"), "--imsize", "64", "--multiscale",
         "--output-dir", str(out), "--no-progress", "--num-workers", "0"]
    )  # fmt: skip
    res = json.loads((out / "retrieval_results.json").read_text())
    assert res["num_distractors"] == 10 and res["num_whitening"] == 10 and res["descriptor_dim"] == 384
    assert res["whitening"]["images"] == 10 and res["backbone"]["source"] == "release-checkpoint"
    s = res["settings"]
    expected = {"topk": 20, "resize_mode": "square", "descriptor": "cls+gem", "whitening": True}
    assert {k: s[k] for k in expected} == expected and s["multiscale"]
    assert res["overall"]["map"] > 0.4, res["overall"]


@pytest.mark.slow
def test_eval_retrieval_revisited_gnd_and_bad_input(copies, backbone_file, tmp_path, capsys):
    names = [p.stem for p in sorted((copies / "gallery").iterdir())][:6]
    gnd = {"imlist": names, "qimlist": names[:2], "gnd": [
        {"easy": [0], "hard": [], "junk": [1]}, {"easy": [], "hard": [1], "junk": [0]}]}  # fmt: skip
    (tmp_path / "gnd.json").write_text(json.dumps(gnd))
    out = tmp_path / "r"
    base = ["--checkpoint", str(backbone_file), "--gallery", str(copies / "gallery"), "--no-progress"]
    retrieval_eval.main(
        [*base, "--gnd", str(tmp_path / "gnd.json"), "--output-dir", str(out), "--imsize", "32"]
    )
    res = json.loads((out / "retrieval_results.json").read_text())
    # Each query is its own (identical) image in the gallery: ranked first, so every protocol scores 1.
    assert {p: r["map"] for p, r in res["revisited"].items()} == {"easy": 1.0, "medium": 1.0, "hard": 1.0}
    assert set(res["queries"][0]) == {"query", "ap_easy", "ap_medium", "ap_hard"}
    with pytest.raises(SystemExit) as exc:
        retrieval_eval.main([*base, "--whitening"])
    assert exc.value.code == 2
    assert "error: --whitening needs --whitening-data DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        retrieval_eval.main([*base, "--query", str(tmp_path / "missing")])
    assert f"error: --query {tmp_path / 'missing'} is not a folder of images" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # copies of gallery images, searched among other images
        retrieval_eval.main(
            [*base[:2], "--gallery", str(copies / "whiten"), "--query", str(copies / "query")]
        )
    assert "error: no query has a positive in the gallery" in capsys.readouterr().err
