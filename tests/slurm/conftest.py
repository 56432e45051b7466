"""One real Slurm cluster for every test of this folder (munged, slurmctld and a slurmd per node,
started once, in a temp folder, on free ports; `cncbrain.slurm_local`). The tests skip, with the
reason, only where Slurm cannot run here (packages missing, not root)."""

from __future__ import annotations

import pytest

from agents.executor_slurm import SlurmExecutor, SlurmSettings
from cncbrain.slurm_local import LocalSlurm, Node, missing

SITE_NODES = ("a1", "a2", "a3")


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = missing()
    if reason:
        pytest.skip(reason)
    cluster = LocalSlurm([Node("a1", {"h100": 4}, partitions=("site-a",)),
                          Node("a2", {"h100": 4}, partitions=("site-a",)),
                          Node("a3", {"l40s": 2}, partitions=("site-a",)),
                          Node("c1", {"a100": 2}, partitions=("cpu-free",))])
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def slurm(slurm_cluster):
    """The shared cluster, left as found: every job cancelled, every node back in service."""
    yield slurm_cluster
    slurm_cluster.run("scancel", "--user=root", check=False)
    for n in SITE_NODES:
        slurm_cluster.run("scontrol", "update", f"nodename={n}", "state=resume", check=False)
    slurm_cluster.wait_nodes(20)


@pytest.fixture
async def executor_for(slurm, tmp_path):
    """Makes executors of `site-a` for the test; stops their watching at its end (their jobs go
    with the `slurm` fixture)."""
    made: list[SlurmExecutor] = []

    def make(site_id: str, **overrides) -> SlurmExecutor:
        settings = SlurmSettings(conf=str(slurm.conf), partition="site-a", workdir=str(tmp_path / site_id),
                                 poll_s=0.2, **overrides)
        ex = SlurmExecutor(site_id, settings)
        made.append(ex)
        return ex

    yield make
    for ex in made:
        await ex.stop()
