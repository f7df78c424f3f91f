"""``python -m eval.attention``: ``eval_attention``
(``python -m eval.attention.visualize``: ``visualize_attention``)."""

from eval.attention.cli import main

raise SystemExit(main())
