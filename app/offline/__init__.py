"""Offline tools the service never imports: folders of images -> features (``datasets``, with tqdm progress)
and detection metrics, tables and plots (``evaluation``, with scikit-learn and matplotlib), for
``calibrate``, ``evaluate`` and the benchmarks."""
