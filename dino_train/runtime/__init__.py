"""What a process needs from its surroundings: the launcher's layout and collectives, the device, mixed
precision, stop signals, and files that are written atomically."""
