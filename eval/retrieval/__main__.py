"""``python -m eval.retrieval`` (or ``torchrun ... -m eval.retrieval``): the command-line tool."""

from eval.retrieval.cli import main

raise SystemExit(main())
