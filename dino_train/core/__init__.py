"""DINO's maths as pure functions of tensors: the loss and its centerings, schedules, the EMA teacher and
collapse telemetry. Imports nothing of the project outside this package: no config, environment or
process group (reductions across processes are passed in as functions)."""
