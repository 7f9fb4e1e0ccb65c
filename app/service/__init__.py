"""Between the web layer and the engine: the batcher, calibration-profile registry, metrics."""
