"""Training: losses, the step/phase table, the loop, checkpoints."""
