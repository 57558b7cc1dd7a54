"""``tunelab plan``: estimate a training run's per-device memory from shapes, before any weight loads."""
