"""Run directories: made, written, read back, listed."""
