"""bench.transfer: the silhouette set it scores teachers on, and its table."""

import json

import numpy as np
import pytest
from PIL import Image

from bench.transfer import CLASSES, generate, main, render

pytestmark = pytest.mark.slow


def test_silhouettes_have_the_asked_polarity_and_their_mask():
    rng = np.random.default_rng(3)
    for name in CLASSES:
        for brighter in (True, False):
            image, labels = render(name, rng, brighter)
            grey = np.asarray(image.convert("L"), dtype=float)
            inside, outside = grey[labels == 1].mean(), grey[labels == 0].mean()
            assert labels.sum() > 40, name  # an object of at least a few 8 px patches
            assert (inside > outside + 60) == brighter and (outside > inside + 60) != brighter, name


def test_the_set_is_deterministic_and_every_val_image_has_a_mask(tmp_path):
    counts = {"train": 2, "val": 2}
    a, b = generate(tmp_path / "a", per_class=counts), generate(tmp_path / "b", per_class=counts)
    files = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert len(files) == len(CLASSES) * 6
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.png"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    for f in (a / "val").rglob("*.png"):
        mask = np.asarray(Image.open(a / "val_masks" / f.relative_to(a / "val")))
        assert set(np.unique(mask)) == {0, 1}


def test_scores_a_backbone_next_to_raw_pixels(tmp_path, backbone_file, capsys):
    out = tmp_path / "transfer.json"
    assert (
        main(
            [str(backbone_file), "--out", str(tmp_path / "set"), "--per-class", "4", "4", "--json", str(out)]
        )
        == 0
    )
    header = next(
        line for line in capsys.readouterr().out.splitlines() if "raw pixels" not in line and "name" in line
    )
    assert "Jaccard, paper's rule" in header and "steps" not in header  # no training columns
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert set(rows) == {"raw pixels", str(backbone_file)}  # no config.yaml beside it: no random row
    scored = rows[str(backbone_file)]
    for key in ("k-NN k=20", "linear probe", "Jaccard, paper's rule", "Jaccard, object brighter",
                "Jaccard, object darker", "Jaccard, head-mean mask"):  # fmt: skip
        assert 0.0 <= scored[key] <= 100.0, key
    assert 0.0 < rows["raw pixels"]["k-NN k=20"] <= 100.0
