"""Ray Train wiring of the heads: data input, per-worker loop, driver."""
