"""``python -m eval.linear`` (or ``torchrun ... -m eval.linear``): the command-line tool."""

from eval.linear.cli import main

raise SystemExit(main())
