"""Services bound and quiet (issue 23, item 6): the local Dask cluster of ``cohortflow run``
listens on loopback only and shows no web dashboard unless configured; Prefect's telemetry is off
on the client and the server side."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from cohortflow.flows.prefect_env import configure_prefect
from cohortflow.flows.protocol_flow import dask_runner
from cohortflow.models.settings import load_settings


def _listening(pids: set[int]) -> set[tuple[str, int]]:
    return {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    }


@pytest.mark.parametrize("configured", [None, "127.0.0.1:0"])
def test_the_local_dask_cluster_listens_on_loopback_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, configured: str | None
) -> None:
    from distributed import Client, LocalCluster

    monkeypatch.setenv("COHORTFLOW_HOME", str(tmp_path / "home"))
    if configured:
        monkeypatch.setenv("COHORTFLOW_FLOW__DASK_DASHBOARD", configured)
    runner = dask_runner(load_settings(None), None, 1)
    with LocalCluster(**runner.cluster_kwargs) as cluster, Client(cluster) as client:
        pids = {os.getpid(), *client.run(os.getpid).values()}
        bound = _listening(pids)
        assert bound, "the cluster listens somewhere"
        assert {ip for ip, _ in bound} == {"127.0.0.1"}, bound
        # the scheduler's HTTP service answers on loopback; its Bokeh pages only when configured
        status = cluster.dashboard_link
        assert status.startswith("http://127.0.0.1:")
        health = urllib.request.urlopen(status.replace("/status", "/health"), timeout=10)
        assert health.status == 200
        if configured is None:
            with pytest.raises(urllib.error.HTTPError, match="404"):
                urllib.request.urlopen(status, timeout=10)
        else:
            assert urllib.request.urlopen(status, timeout=30).status == 200


def test_prefect_telemetry_is_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "DO_NOT_TRACK",
        "PREFECT_SERVER_ANALYTICS_ENABLED",
        "PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY",
    ):
        monkeypatch.delenv(name, raising=False)
    configure_prefect(tmp_path)
    from prefect._internal.analytics.enabled import is_telemetry_enabled

    assert os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert os.environ["PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY"] == "false"
    monkeypatch.delenv("CI", raising=False)
    assert not is_telemetry_enabled()
