"""Bulk scoring of whole data sets on Ray Data (``ddm-anomaly score-dataset``; docs/DEPLOYMENT.md).

Needs the optional ``bulk`` extra (``pip install -e '.[bulk]'``: Ray Data). The service never imports this
package (tests/test_layers.py); the command imports it when it runs.

    from app.bulk import BulkOptions, score_dataset
    summary = score_dataset("images/", "scores.parquet", options=BulkOptions(profile="default"))
"""

from app.bulk.job import BulkOptions, BulkSummary, score_dataset

__all__ = ["BulkOptions", "BulkSummary", "score_dataset"]
