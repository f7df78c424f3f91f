"""Entry point: ``torchrun dino_train/main.py --config configs/<recipe>.yaml [section.key=value ...]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "__main__" and __package__ in (None, ""):
    # Run as a script (torchrun dino_train/main.py): this folder is on sys.path instead of the repo root,
    # which would let our module names shadow others and hide the dino_train package.
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path.insert(0, str(here.parent))

from dino_train.config import ConfigError, load_config, to_dict  # noqa: E402
from dino_train.data import DataError  # noqa: E402
from dino_train.runtime.device import DeviceError  # noqa: E402
from dino_train.runtime.files import CheckpointError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="DINO self-supervised pretraining. Settings come from the schema defaults (the original "
        "release's), then --config, then section.key=value overrides, "
        "e.g. optim.lr=0.001 data.path=/imagenet/train",
    )
    p.add_argument("--config", type=Path, default=None, help="recipe yaml (see configs/)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
            return 0
        from dino_train.train import NonFiniteError, PeerError, train

        try:
            train(cfg)
        except (NonFiniteError, PeerError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 3
    except (ConfigError, DataError, CheckpointError, DeviceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
