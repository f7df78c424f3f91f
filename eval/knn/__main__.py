"""``python -m eval.knn`` (or ``torchrun ... -m eval.knn``): the command-line tool."""

from eval.knn.cli import main

raise SystemExit(main())
