"""Training: the run's state, one optimizer step, the step-indexed loop and its hooks, checkpoints."""

from dino_train.train.loop import NonFiniteError, PeerError, TrainResult, train

__all__ = ["NonFiniteError", "PeerError", "TrainResult", "train"]
