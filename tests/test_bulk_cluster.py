"""``score-dataset`` on a Ray cluster of two nodes on this machine (``ray.cluster_utils.Cluster``, one CPU
each): the job joins it as it would join a remote cluster, its actors run on both nodes, and every path
comes back as exactly one row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import ray
from ray.cluster_utils import Cluster

from app.cli import main
from tests.helpers import SHIPPED_MODEL, require_data

NODE = {"num_cpus": 1, "object_store_memory": 96 * 2**20}


@pytest.fixture(scope="module")
def two_nodes() -> Any:
    cluster = Cluster(initialize_head=True, head_node_args={**NODE, "include_dashboard": False})
    cluster.add_node(**NODE)
    cluster.wait_for_nodes(timeout=120)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_actors_on_both_nodes_and_no_row_lost(two_nodes: Cluster, tmp_path: Path) -> None:
    files = [str(p) for p in require_data("celeba", 48)]
    listed = tmp_path / "paths.txt"
    listed.write_text("\n".join(files) + "\n")
    out = tmp_path / "scores.parquet"
    # 0.75 CPU per actor: two cannot share a 1-CPU node, and each node keeps a quarter for decode tasks
    args = ["score-dataset", str(listed), "--out", str(out), "--address", two_nodes.address,
            "--model", str(SHIPPED_MODEL), "--device", "cpu", "--threads", "1", "--concurrency", "2",
            "--cpus-per-actor", "0.75", "--batch-size", "8", "--part-rows", "16"]  # fmt: skip
    assert main(args) == 0
    assert not ray.is_initialized()  # the job joined the cluster and left it; the cluster stays up
    rows = pd.read_parquet(out)
    assert sorted(rows["path"]) == files and rows["error"].isna().all() and rows["score"].notna().all()
    ray.init(address=two_nodes.address, log_to_driver=False)
    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    assert set(rows["node"]) == nodes
