"""The bottom layer: errors, records, data types, options, the Run, stops, device, distributed, checkpoint files, progress. Imports nothing else of cnnreg."""
