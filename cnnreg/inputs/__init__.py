"""Data on its way to the model: splits, image files and their cache, batches, batch preparation."""
