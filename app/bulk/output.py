"""The result of ``score-dataset``: a folder of Parquet files (``OUT.parquet/part-*.parquet``), one row per
input path, readable as one table by pandas, pyarrow, Spark or Ray (``pd.read_parquet("OUT.parquet")``).

Each part is written to a hidden temporary name and renamed into place once complete, so a reader or a
``--resume`` never sees half a part: a job stopped midway leaves whole parts and at most one hidden
temporary file (removed by the next run). ``--resume`` reads the ``path`` column of the parts and scores
only the rest; the rows already there must come from the same model and profile."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from app.errors import InvalidInput

SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("score", pa.float64()),  # -log density of the features under the profile; null when not finite
        ("threshold", pa.float64()),  # at the profile's default false-positive rate
        ("thresholds", pa.string()),  # JSON {"<fpr>": threshold} of every rate the profile has
        ("is_anomaly", pa.bool_()),  # the verdict: score > threshold
        ("p_value", pa.float64()),
        ("percentile", pa.float64()),  # among the profile's normal images
        ("model_id", pa.string()),
        ("profile", pa.string()),
        ("options", pa.string()),  # JSON of the method options the score was computed with
        ("error", pa.string()),  # why the file was not scored (then score and verdict are null)
        ("node", pa.string()),  # the Ray node that scored it
    ]
)
PART_GLOB = "part-*.parquet"
TEMP_PREFIX = ".part-"


class ResultFolder:
    """The output folder: which paths it holds, and whole parts added to it."""

    def __init__(self, out: str | Path) -> None:
        self.path = Path(out)
        self.parts_written = 0  # by this run
        self._first = 0  # numbering continues after the parts of earlier runs

    def parts(self) -> list[Path]:
        return sorted(self.path.glob(PART_GLOB)) if self.path.is_dir() else []

    def prepare(self, resume: bool, model_id: str, profile: str) -> pa.Array:
        """Make the folder ready for this run; return the paths it holds already (empty unless resuming)."""
        if self.path.exists() and not self.path.is_dir():
            raise InvalidInput(f"{self.path} exists and is not a folder of Parquet parts")
        parts = self.parts()
        self._first = len(parts)
        if parts and not resume:
            raise InvalidInput(f"{self.path} holds {len(parts)} part(s) already: pass --resume to add to it")
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob(f"{TEMP_PREFIX}*"):
            stale.unlink(missing_ok=True)  # an interrupted write of an earlier run
        if not parts:
            return pa.array([], pa.string())
        done = pq.read_table(self.path, columns=["path", "model_id", "profile"], schema=SCHEMA)
        for column, expected in (("model_id", model_id), ("profile", profile)):
            found = set(pc.unique(done.column(column)).to_pylist()) - {expected}
            if found:
                raise InvalidInput(
                    f"{self.path} holds rows of {column} {sorted(found)}; this run scores with {expected!r}"
                )
        return pc.unique(done.column("path"))

    def write(self, table: pa.Table) -> Path:
        """Add one part atomically: written under a hidden name, flushed to disk, then renamed."""
        name = f"part-{self._first + self.parts_written:05d}-{uuid.uuid4().hex[:12]}.parquet"
        tmp = self.path / f"{TEMP_PREFIX}{name}.tmp"
        final = self.path / name
        try:
            with open(tmp, "wb") as fh:
                pq.write_table(table.cast(SCHEMA), fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.parts_written += 1
        return final
