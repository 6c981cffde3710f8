"""What the commands do beyond one training: validate, cross-validation, sweeps, reopening and predicting, export."""
