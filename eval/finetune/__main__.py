"""``python -m eval.finetune`` (or ``torchrun ... -m eval.finetune``): the command-line tool."""

from eval.finetune.cli import main

raise SystemExit(main())
