"""Bulk scoring of whole data sets on Ray Data (``ddm-anomaly score-dataset``; docs/DEPLOYMENT.md).

Needs the optional ``bulk`` extra (``pip install -e '.[bulk]'``: Ray Data). The service never imports this
package (tests/test_layers.py); the command imports it when it runs.

    from app.bulk import BulkOptions, score_dataset
    summary = score_dataset("images/", "scores.parquet", options=BulkOptions(profile="default"))

The names are loaded on first use: a decode worker imports ``app.bulk.decode`` alone, without Ray's
driver side and the engine's model stack.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from app.bulk.job import BulkOptions, BulkSummary, score_dataset

__all__ = ["BulkOptions", "BulkSummary", "score_dataset"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from app.bulk import job

        return getattr(job, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
