"""Calibration profiles (METHOD.md step 5), one concern per module; import from the module itself:

- ``density``: the densities over normal features (Gaussian mixture, 1-D KDE, direct score) and their kinds;
- ``thresholds``: cross-fitted scores, conformal thresholds, false-positive-rate checks, verdicts;
- ``profile``: the ``Profile`` dataclass, its JSON form and format versions (how to add a field: there);
- ``fit``: ``fit_profile``, features of normal images -> a profile (density chosen by the method registry);
- ``store``: ``ProfileStore``, the profiles of one model and method options on disk.

This package imports nothing at package level, so ``app.engine.methods`` can use ``density`` without a cycle.
"""
