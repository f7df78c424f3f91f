"""What a fine-tuning run reports: a line per epoch, TensorBoard scalars, ``finetune_results.json`` (every
epoch, the best and the last, every setting that produced them), and what its saved files record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from dino_train.data.labelled import ClassFolders
from dino_train.models.pos_embed import ReleasePosEmbedViT
from dino_train.runtime.files import write_json
from eval.common import backbone_record

RESULTS_FILE = "finetune_results.json"
BEST_FILE = "finetune_best.pth"
# Settings a resumed run may change: where and how fast it runs, not what it computes.
NOT_IDENTITY = ("output_dir", "num_workers", "no_progress", "no_resume", "device", "world_size", "precision")


def identity_of(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings a resumed run must share with the run that wrote the checkpoint."""
    return {k: v for k, v in settings.items() if k not in NOT_IDENTITY and k != "precision_used"}


def summary_line(settings: dict[str, Any]) -> str:
    s = settings
    return (
        f"fine-tuning {s['epochs']} epochs x {s['steps_per_epoch']} steps of {s['total_batch']} images "
        f"({s['world_size']} process(es), {s['device']}, {s['precision_used']}): AdamW peak lr "
        f"{s['lr_scaled']:.3g}, layer decay {s['layer_decay_applied']}, drop path {s['drop_path_applied']}; "
        f"images {s['resize']} -> {s['crop']} px for val"
    )


def backbone_spec_record(backbone: nn.Module, info: dict[str, Any]) -> dict[str, Any]:
    """How to rebuild the backbone (what our training checkpoints record); ``dino_train.models.loading``
    reads it back."""
    rule = "release" if isinstance(backbone, ReleasePosEmbedViT) else "timm"
    return {"timm_name": info["timm_name"], "kwargs": dict(info.get("timm_kwargs") or {}), "pos_embed": rule}


class Progress:
    """The run's history as it grows: the best epoch (highest val top-1, the earliest on ties), a printed
    line per epoch and TensorBoard scalars on the main process, and the results file."""

    def __init__(self, out: Path, history: list[dict[str, Any]], main: bool):
        self.out, self.history, self.main = out, history, main
        self.best: dict[str, Any] | None = None
        for record in history:
            self._consider(record)
        self.writer: Any = None

    def _consider(self, record: dict[str, Any]) -> None:
        if self.best is None or record["top1"] > self.best["top1"]:
            self.best = record

    def add(self, record: dict[str, Any], epochs: int) -> None:
        """``record`` has just been appended to the history."""
        self._consider(record)
        if not self.main:
            return
        e, b = record["epoch"], self.best
        print(
            f"epoch {e} ({e + 1}/{epochs} done): loss {record['train_loss']:.4f}, lr {record['lr']:.3g}, "
            f"val top-1 {record['top1']:.2f} top-5 {record['top5']:.2f} (best {b['top1']:.2f}, epoch "
            f"{b['epoch']}), {record['seconds']:.0f} s",
            flush=True,
        )
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter  # slow import; rank 0 only

            self.writer = SummaryWriter(log_dir=str(self.out / "tensorboard"))
        for key in ("top1", "top5", "train_loss", "lr"):
            self.writer.add_scalar(f"finetune/{key}", record[key], e)
        self.writer.flush()

    def write(self, data: ClassFolders, info: dict[str, Any], settings: dict[str, Any]) -> None:
        """``finetune_results.json``: the history so far, the data set, the backbone and every setting."""
        write_json(
            self.out / RESULTS_FILE,
            {
                "best": self.best,
                "last": self.history[-1] if self.history else None,
                "note": "best: the epoch with the highest val top-1 (chosen on val, as the release reports); "
                "last: the final epoch's. Epochs are 0-based indices.",
                "history": self.history,
                "epochs": settings["epochs"],
                "epochs_completed": len(self.history),
                "num_classes": len(data.classes),
                "num_train": len(data.train),
                "num_val": len(data.val),
                "classes": data.classes,
                "missing_from_train": data.missing_from_train,
                "backbone": backbone_record(info),
                "settings": settings,
                "best_weights": str(self.out / BEST_FILE),
            },
        )

    def finish(self, data: ClassFolders, info: dict[str, Any], settings: dict[str, Any]) -> None:
        if not self.main:
            return
        if self.writer is not None:
            self.writer.close()
        self.write(data, info, settings)
        if self.best is not None:
            last = self.history[-1]
            print(
                f"best val top-1 {self.best['top1']:.2f} (top-5 {self.best['top5']:.2f}) at epoch "
                f"{self.best['epoch']}; last epoch {last['epoch']}: top-1 {last['top1']:.2f}. "
                f"Results in {self.out / RESULTS_FILE}, best weights in {self.out / BEST_FILE}",
                flush=True,
            )
