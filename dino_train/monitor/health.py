"""The collapse detector: turns the telemetry of ``dino_train.core.metrics`` into warnings with likely
fixes, once per episode."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CollapseDetector:
    """Warns when a collapse sign persists over ``patience`` consecutive checks, once per episode.

    Uniform collapse needs two signs: the teacher's distributions near uniform *and* carrying almost no
    information about the image. A flat but informative teacher is a normal phase of short runs with many
    prototypes on small data (measured on the demo: entropy 97-99% of ln K for hundreds of steps while
    k-NN rose from 27% to 49%, with 0.066-0.2 nats of information); collapsed demo variants settled at
    0.003-0.02 nats. The information is estimated within a batch, which underestimates it for small
    batches, so the threshold sits nearer the collapsed values.
    """

    patience: int = 3
    uniform_entropy_ratio: float = 0.97  # teacher this close to uniform
    min_information: float = 0.03  # nats; the teacher's output this independent of the image
    one_prototype_ratio: float = 0.05  # batch-mean entropy this low
    min_feature_std: float = 1e-3  # normalised features this close to one point
    streaks: dict[str, int] = field(default_factory=dict)

    def check(self, metrics: dict[str, float], step: int) -> list[str]:
        signs = {
            "uniform": metrics.get("teacher_entropy_ratio", 0.0) > self.uniform_entropy_ratio
            and metrics.get("teacher_information", 0.0) < self.min_information,
            "one_prototype": metrics.get("batch_entropy_ratio", 1.0) < self.one_prototype_ratio,
            "feature_std": metrics.get("student_feature_std", 1.0) < self.min_feature_std,
        }
        warnings = []
        for name, present in signs.items():
            self.streaks[name] = self.streaks.get(name, 0) + 1 if present else 0
            if self.streaks[name] == self.patience:
                warnings.append(f"step {step}: " + _MESSAGES[name].format(**metrics))
        return warnings


_MESSAGES = {
    "uniform": (
        "uniform collapse: the teacher's output is near uniform (entropy {teacher_entropy_ratio:.0%} of "
        "ln K) and the same for every image ({teacher_information:.3f} nats of information), the loss sits "
        "at ln K. Likely fixes: a lower dino.teacher_temp (0.04), a teacher-temperature "
        "warmup (dino.warmup_teacher_temp_epochs), a longer optim.warmup_epochs."
    ),
    "one_prototype": (
        "one-prototype collapse: the teacher sends the whole batch to {prototypes_in_use:.0f} prototype(s) "
        "(batch entropy {batch_entropy_ratio:.1%} of ln K). Likely fixes: stronger centering (a "
        "dino.center_momentum of 0.9, not 0.99+), a higher dino.teacher_temp, a lower optim.lr or a "
        "longer warmup."
    ),
    "feature_std": (
        "feature collapse: the student's features have almost no spread (std {student_feature_std:.2e}). "
        "Likely fixes: a lower optim.lr, a longer optim.warmup_epochs, a higher dino.momentum_teacher."
    ),
}
