"""The science shared with training: forward model, windows, peaks, the physics fit, post-processing."""
