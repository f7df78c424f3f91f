"""Watching a run: console, TensorBoard and JSON-lines logs, the collapse detector, periodic k-NN and
attention maps (through ``eval``'s primitives), and the run report."""
