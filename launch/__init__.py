"""Launchers: the demo, Slurm submission through submitit."""
