"""The science: model loading, trajectory statistics, features, calibration. Imports no web code."""
