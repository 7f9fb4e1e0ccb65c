"""``ddm-anomaly score-dataset`` on a real local Ray (one per module, 2 CPUs, a small object store): the rows
equal ``ddm-anomaly score`` on the same files (shipped model, default profile), from a folder and from a
Parquet list; unreadable files become error rows; ``--resume`` scores only the paths OUT lacks. The INPUT
forms are read without Ray. The two-node cluster is in test_bulk_cluster.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from app.bulk.inputs import list_inputs
from app.cli import main
from app.errors import InvalidInput
from tests.helpers import SHIPPED_MODEL, png_bytes, require_data

MODEL = ["--model", str(SHIPPED_MODEL), "--device", "cpu"]
BROKEN = {"truncated.png": png_bytes()[:200], "text.png": b"not an image at all", "empty.png": b""}


@pytest.fixture(scope="module")
def local_ray() -> Any:
    ray.init(
        num_cpus=2, object_store_memory=128 * 2**20, include_dashboard=False, log_to_driver=False
    )  # the job finds it running and leaves it running
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """200 images (CelebA: mostly normal; CIFAR-10: mostly anomalous) and three broken files, one folder."""
    folder = tmp_path_factory.mktemp("bulk") / "images"
    for name, count in (("celeba", 100), ("cifar10", 100)):
        (folder / name).mkdir(parents=True)
        for path in require_data(name, count):
            (folder / name / path.name).symlink_to(path)
    for name, data in BROKEN.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def reference(images: Path) -> dict[str, dict[str, Any]]:
    """``ddm-anomaly score`` on every file of the folder, one JSON line per file, by path."""
    import contextlib
    import io

    files = sorted(str(p) for p in images.rglob("*.png"))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["score", *MODEL, "--batch-size", "32", *files])
    assert code == 1  # the broken files
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    return {line["image"]: line for line in lines}


@pytest.fixture(scope="module")
def folder_run(local_ray: Any, images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bulk-out") / "scores.parquet"
    code = main(["score-dataset", str(images), "--out", str(out), *MODEL, "--batch-size", "32",
                 "--part-rows", "64"])  # fmt: skip
    assert code == 0
    return out


def assert_equal_to_score(rows: pd.DataFrame, reference: dict[str, dict[str, Any]]) -> None:
    scored = rows[rows["error"].isna()]
    assert len(scored) and scored["score"].notna().all()
    for row in scored.itertuples():
        expected = reference[row.path]
        # ``score`` prints the digits that mean something (app/offline/score_report.py): the Parquet rows
        # keep full precision and round to exactly what it printed
        assert round(row.score, 3) == expected["score"], row.path
        assert row.is_anomaly == expected["is_anomaly"], row.path
        assert (
            round(row.threshold, 3) == expected["threshold"] and round(row.p_value, 4) == expected["p_value"]
        )
        assert round(row.percentile, 1) == expected["percentile"]
        assert (row.model_id, row.profile) == (expected["model_id"], "default")


def test_folder_rows_equal_the_score_command(folder_run: Path, reference: dict[str, dict[str, Any]]) -> None:
    rows = pd.read_parquet(folder_run)
    assert len(rows) == len(reference) == 203 and rows["path"].is_unique
    assert set(rows["path"]) == set(reference)
    assert_equal_to_score(rows, reference)
    verdicts = rows.loc[rows["error"].isna(), "is_anomaly"]
    assert 0 < verdicts.sum() < len(verdicts)  # both verdicts occur: "same verdicts" is not vacuous
    assert len(list(folder_run.glob("part-*.parquet"))) == 4  # 203 rows in parts of 64
    assert not list(folder_run.glob(".*"))  # no temporary file left


def test_unreadable_files_become_error_rows(folder_run: Path, reference: dict[str, dict[str, Any]]) -> None:
    rows = pd.read_parquet(folder_run).set_index("path")
    errors = rows[rows["error"].notna()]
    assert sorted(Path(p).name for p in errors.index) == sorted(BROKEN)
    assert errors["score"].isna().all() and errors["is_anomaly"].isna().all()
    for path, row in errors.iterrows():
        assert row["error"] == reference[path]["error"]  # the score command's message, the service's decoder
    assert "empty image" in errors.loc[[p for p in errors.index if p.endswith("empty.png")], "error"].iloc[0]


def test_parquet_list_with_resume_scores_only_what_is_missing(
    folder_run: Path,
    images: Path,
    reference: dict[str, dict[str, Any]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    out = tmp_path / "resumed.parquet"
    out.mkdir()
    kept = sorted(folder_run.glob("part-*.parquet"))[:2]  # 128 rows of an earlier, interrupted run
    for part in kept:
        shutil.copy(part, out / part.name)
    (out / ".part-00002-interrupted.parquet.tmp").write_bytes(b"half a part")
    before = set(pd.read_parquet(out)["path"])
    listed = tmp_path / "list.parquet"
    paths = [*sorted(reference), str(images / "missing.png")]
    pq.write_table(pa.table({"file": paths, "label": range(len(paths))}), listed)

    args = ["score-dataset", str(listed), "--column", "file", "--out", str(out), *MODEL, "--batch-size", "32"]
    assert main(args) == 2  # OUT holds parts: refused, nothing written
    assert "pass --resume" in caplog.text
    assert main([*args, "--resume"]) == 0

    new_parts = sorted(set(out.glob("part-*.parquet")) - {out / p.name for p in kept})
    added = pd.concat([pd.read_parquet(p) for p in new_parts])
    assert set(added["path"]) == set(paths) - before and len(added) == len(paths) - len(before)
    rows = pd.read_parquet(out)
    assert len(rows) == len(paths) and rows["path"].is_unique
    assert "No such file" in rows.set_index("path").loc[str(images / "missing.png"), "error"]
    assert_equal_to_score(added, reference)
    assert not list(out.glob(".*"))  # the interrupted write's temporary file is gone


def test_resume_refuses_rows_of_another_profile(
    folder_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "other.parquet"
    shutil.copytree(folder_run, out)
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    shutil.copy(SHIPPED_MODEL / "profiles" / "default.json", profiles / "faces.json")
    args = ["score-dataset", str(folder_run), "--out", str(out), "--resume", "--profile", "faces", *MODEL]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DDM_PROFILES_DIR", str(profiles))
        assert main(args) == 2
    assert "holds rows of profile ['default']; this run scores with 'faces'" in caplog.text


def test_input_forms(tmp_path: Path) -> None:
    for name in ("a.png", "sub/b.JPG", "sub/deeper/c.webp", "notes.txt"):
        (tmp_path / "data" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / name).write_bytes(b"")
    images = [str(tmp_path / "data" / n) for n in ("a.png", "sub/b.JPG", "sub/deeper/c.webp")]
    assert list_inputs(tmp_path / "data") == sorted(images)
    assert list_inputs(str(tmp_path / "data" / "**" / "*.png")) == [images[0]]
    text = tmp_path / "paths.txt"
    text.write_text(f"# a comment\n{images[1]}\n\n{images[0]}\n{images[0]}\n")
    assert list_inputs(text) == sorted(images[:2])  # each path once
    csv = tmp_path / "paths.csv"
    csv.write_text("id,file\n1,data/a.png\n")
    with pytest.MonkeyPatch.context() as env:
        env.chdir(tmp_path)  # relative paths in a list: from the current folder, as the score command
        assert list_inputs(csv, column="file") == [images[0]]
    with pytest.raises(InvalidInput, match="no column 'path'"):
        list_inputs(csv)
    with pytest.raises(InvalidInput, match="no such"):
        list_inputs(tmp_path / "absent")
