"""``python -m eval.video_seg`` (or ``torchrun ... -m eval.video_seg``): the command-line tool."""

from eval.video_seg.cli import main

raise SystemExit(main())
