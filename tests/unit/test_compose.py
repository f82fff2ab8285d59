"""docker/compose.yaml, the scale-out example, agrees with the files and the configuration it
names (the tests do not run Docker; the same node, workers and broker run for real in
tests/integration/test_celery.py)."""

from __future__ import annotations

from pathlib import Path

import yaml

from dicomnode.config import load

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker" / "compose.yaml"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_orthanc_a_node_redis_and_workers():
    services = compose()["services"]
    assert set(services) == {"orthanc", "node", "redis", "worker"}
    assert services["worker"]["deploy"]["replicas"] == 2
    assert "--appendonly" in services["redis"]["command"]  # queued jobs survive a restart


def test_the_node_and_the_workers_share_one_configuration(monkeypatch):
    monkeypatch.setenv("DICOMNODE_WORKER_TOKEN", "x")
    monkeypatch.setenv("DICOMNODE_STATUS_TOKEN", "y")
    services = compose()["services"]
    node, worker = services["node"]["command"], services["worker"]["command"]
    assert node[0] == "serve" and worker[0] == "worker" and node[1:] == worker[1:]
    config = load(ROOT / node[node.index("--config") + 1])
    assert config.runner.kind == "celery"
    assert config.runner.broker_url.startswith("redis://redis:")
    assert config.runner.node_url == f"http://node:{config.http.port}/"
    published = {int(p.split(":")[1]) for p in services["node"]["ports"]}
    assert {config.node.port, config.http.port} <= published
    assert config.destinations[0].url.startswith("http://orthanc:8042/")
    # The workers read the node's spool read-only, where the node writes it.
    assert f"spool:{config.node.data_dir}:ro" in services["worker"]["volumes"]
    assert f"spool:{config.node.data_dir}" in services["node"]["volumes"]


def test_the_files_it_mounts_and_builds_exist():
    services = compose()["services"]
    for volume in services["orthanc"]["volumes"]:
        assert (COMPOSE.parent / volume.split(":")[0]).is_file()
    build = compose()["x-dicomnode"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).is_file()
