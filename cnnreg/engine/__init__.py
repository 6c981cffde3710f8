"""Training: the loop (fit, epochs, evaluation), the step, the device-side tallies, the resumable training state."""
