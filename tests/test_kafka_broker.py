"""The Apache Kafka launcher's pieces that need no running broker."""

from __future__ import annotations

import base64
import stat

import pytest

from emostream.worker.broker import BrokerError, make_broker
from emostream.worker.kafka_broker import KafkaCluster, cluster_properties, java_major, new_cluster_id, require_java


def test_one_node_keeps_every_internal_topic_at_one_replica():
    p = cluster_properties(1)
    assert p["process.roles"] == "broker,controller"
    for key in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor",
                "share.coordinator.state.topic.replication.factor", "default.replication.factor"):
        assert p[key] == "1", key
    assert p["transaction.state.log.min.isr"] == p["min.insync.replicas"] == "1"
    assert p["offsets.topic.num.partitions"] == "1"


def test_three_nodes_replicate_three_ways_and_need_two_in_sync():
    p = cluster_properties(3)
    assert p["default.replication.factor"] == p["offsets.topic.replication.factor"] == "3"
    assert p["min.insync.replicas"] == p["transaction.state.log.min.isr"] == "2"
    assert int(p["broker.session.timeout.ms"]) > int(p["broker.heartbeat.interval.ms"])


def test_cluster_ids_look_like_kafkas():
    for _ in range(200):
        cid = new_cluster_id()
        assert len(cid) == 22 and not cid.startswith("-")
        assert len(base64.urlsafe_b64decode(cid + "==")) == 16


def fake_java(tmp_path, banner: str):
    java = tmp_path / "java"
    java.write_text(f"#!/bin/sh\necho '{banner}' >&2\n")
    java.chmod(java.stat().st_mode | stat.S_IEXEC)
    return str(java)


@pytest.mark.parametrize("banner, major", [('openjdk version "17.0.15" 2025-04-15', 17),
                                           ('java version "1.8.0_392"', 8), ('openjdk version "21" 2023-09-19', 21)])
def test_java_major(tmp_path, banner, major):
    assert java_major(fake_java(tmp_path, banner)) == major


def test_old_java_is_refused_with_one_clear_line(tmp_path, monkeypatch):
    fake_java(tmp_path, 'openjdk version "11.0.2"')
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrokerError, match=r"needs Java 17 or newer \(found Java 11\)"):
        require_java()


def test_engines_reject_what_they_cannot_do(tmp_path):
    with pytest.raises(BrokerError, match="need --engine kafka"):
        make_broker("tansu", data_dir=tmp_path)
    with pytest.raises(BrokerError, match="unknown broker engine"):
        make_broker("redpanda")
    assert isinstance(make_broker("kafka", nodes=3, data_dir=tmp_path), KafkaCluster)


def test_a_data_dir_remembers_its_cluster(tmp_path):
    first = KafkaCluster(port=19000, nodes=3, data_dir=tmp_path)
    cid, ports = first._layout()
    again = KafkaCluster(port=19000, nodes=3, data_dir=tmp_path)
    assert again._layout() == (cid, ports) and len(set(ports)) == 3
    with pytest.raises(BrokerError, match="3-node cluster, not 1"):
        KafkaCluster(port=19000, nodes=1, data_dir=tmp_path)._layout()
