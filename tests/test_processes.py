"""`--processes N`: the plan (cores, settings per child) and real processes in one consumer group."""

from __future__ import annotations

import signal
import socket
import time
import urllib.request

import orjson
import psutil
import pytest

from emostream.worker.broker import free_port
from emostream.worker.processes import Child, exit_code, plan
from emostream.worker.settings import Settings, child_env

from conftest import Topics
from group import wait_for_group


def settings(**kw) -> Settings:
    return Settings.from_env(environ={}, **kw)


def test_one_process_per_core_each_pinned_to_its_own():
    children = plan(settings(processes=0, metrics_port=9108), [0, 1, 2])
    assert [c.cores for c in children] == [(0,), (1,), (2,)]
    assert [c.overrides["metrics_port"] for c in children] == ["9108", "9109", "9110"]
    assert all(c.overrides["processes"] == "1" for c in children)
    # pinned children plan their own threads from the cores they are given
    assert all("inference_streams" not in c.overrides for c in children)


def test_cores_are_split_into_disjoint_shares_that_cover_them_all():
    children = plan(settings(processes=2), [0, 1, 4, 5, 6])
    assert [c.cores for c in children] == [(0, 1), (4, 5, 6)]


def test_more_processes_than_cores_run_unpinned_and_single_threaded():
    children = plan(settings(processes=3), [0, 1])
    assert [c.cores for c in children] == [None, None, None]
    assert all(c.overrides["inference_streams"] == "1" and c.overrides["inference_threads"] == "1"
               for c in children)


def test_metrics_off_stays_off_in_every_child():
    children = plan(settings(processes=2, metrics_port=0), [0, 1])
    assert all("metrics_port" not in c.overrides for c in children)
    env = child_env(settings(processes=2, metrics_port=0), environ={}, **children[1].overrides)
    assert Settings.from_env(env).metrics_port == 0


def test_a_child_gets_the_parents_settings_with_its_own_overrides():
    parent = settings(processes=2, batch_max=17, input_topic="posts", metrics_port=9200)
    child = Child(1, (1,), {"processes": "1", "metrics_port": "9201"})
    env = child_env(parent, environ={"PATH": "/bin", "EMOSTREAM_BATCH_MAX": "99"}, **child.overrides)
    assert env["PATH"] == "/bin"  # the rest of the environment passes through
    got = Settings.from_env(env)
    assert got == parent.model_copy(update={"processes": 1, "metrics_port": 9201})


def test_exit_codes_as_a_shell_reports_them():
    assert exit_code(0) == 0 and exit_code(3) == 3
    assert exit_code(-signal.SIGKILL) == 137 and exit_code(-signal.SIGTERM) == 143


def _two_free_ports() -> int:
    for _ in range(50):
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two adjacent free ports")


def _metric(port: int, name: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in body.splitlines() if line.startswith(name + " "))


def _children(parent_pid: int, n: int, timeout: float = 30.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = psutil.Process(parent_pid).children()
        if len(kids) >= n:
            return kids
        time.sleep(0.2)
    raise AssertionError(f"expected {n} worker processes")


def _start_two(t: Topics, start_worker, **extra):
    """``emostream worker --processes 2`` until both children own partitions: (command, children)."""
    w = start_worker(t, processes=2, **extra)
    kids = _children(w.proc.pid, 2)
    wait_for_group([w], members=2, partitions=t.settings.partitions)
    return w, kids


@pytest.mark.broker
def test_two_processes_share_the_partitions_and_stop_together(broker, start_worker):
    t = Topics(broker, partitions=4)
    port = _two_free_ports()
    w, kids = _start_two(t, start_worker, metrics_port=port)
    if len(psutil.Process().cpu_affinity()) >= 2:
        masks = [set(k.cpu_affinity()) for k in kids]
        assert all(masks) and not masks[0] & masks[1], masks
    n = 400
    t.produce([orjson.dumps({"id": str(i), "text": f"work item {i}"}) for i in range(n)],
              keys=[str(i).encode() for i in range(n)])
    outs = t.outputs(n, timeout=120)
    assert sorted(int(o["id"]) for o in outs) == list(range(n))
    per_process = [_metric(p, "emostream_records_out_total") for p in (port, port + 1)]
    assert all(c > 0 for c in per_process) and sum(per_process) >= n, per_process
    assert w.stop(signal.SIGTERM) == 0, w.output()[-3000:]
    assert not any(k.is_running() and k.status() != psutil.STATUS_ZOMBIE for k in kids)


@pytest.mark.broker
@pytest.mark.fault
def test_a_crashed_process_stops_the_others_and_the_command_fails(broker, start_worker):
    t = Topics(broker, partitions=2)
    w, kids = _start_two(t, start_worker)
    kids[0].kill()
    assert w.proc.wait(60) == 137, w.output()[-3000:]
    assert "exited (137); stopping the other 1" in w.output()
    psutil.wait_procs(kids, timeout=10)
    assert not any(k.is_running() and k.status() != psutil.STATUS_ZOMBIE for k in kids)


@pytest.mark.broker
@pytest.mark.fault
def test_children_do_not_outlive_a_killed_command(broker, start_worker):
    t = Topics(broker, partitions=2)
    w, kids = _start_two(t, start_worker)
    w.proc.kill()
    gone, alive = psutil.wait_procs(kids, timeout=40)
    assert not alive, [k.pid for k in alive]
