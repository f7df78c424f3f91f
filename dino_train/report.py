"""``python -m dino_train.report RUN_DIR``: kept as a short name for ``dino_train.monitor.report``."""

from dino_train.monitor.report import main

if __name__ == "__main__":
    raise SystemExit(main())
