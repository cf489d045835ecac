"""The emostream command line, as a user runs it."""

import os
import signal
import subprocess
import sys

import orjson
import pytest

from emostream.worker.broker import free_port, wait_for_port

EMO = [sys.executable, "-m", "emostream.worker.cli"]


def run(args, input=None, env=None, timeout=120):
    return subprocess.run(EMO + args, input=input, capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_classify_argument_gives_28_sensible_scores():
    p = run(["classify", "Thank you so much, I love it"])
    assert p.returncode == 0, p.stderr.decode()
    lines = p.stdout.decode().splitlines()
    assert len(lines) == 1
    rec = orjson.loads(lines[0])
    head = rec["emotions"]["go_emotions"]
    assert len(head["scores"]) == 28
    assert {"gratitude", "love"} & set(head["labels"])
    assert head["top"] in ("gratitude", "love")


def test_classify_stdin_one_per_line_in_order():
    texts = ["I am furious about this", "This is hilarious lol", "I'm so scared", "ok"]
    p = run(["classify"], input="\n".join(texts).encode())
    recs = [orjson.loads(x) for x in p.stdout.decode().splitlines()]
    assert [r["text"] for r in recs] == texts
    assert recs[0]["emotions"]["go_emotions"]["scores"]["anger"] > recs[1]["emotions"]["go_emotions"]["scores"]["anger"]
    assert recs[1]["emotions"]["go_emotions"]["top"] == "amusement"
    assert recs[2]["emotions"]["go_emotions"]["scores"]["fear"] > 0.3


def test_classify_table():
    p = run(["classify", "--table", "what a wonderful surprise"])
    assert p.returncode == 0 and b"go_emotions" in p.stdout


def test_unknown_model_is_a_clear_error():
    p = run(["classify", "--model", "no-such-model", "hi"])
    assert p.returncode != 0
    assert b"unknown model" in p.stderr + p.stdout


def test_models_lists_the_default():
    p = run(["models"])
    assert b"minilm-go-emotions" in p.stdout and b"go_emotions(multi_label)" in p.stdout


@pytest.mark.broker
def test_broker_command_starts_and_stops(engine, tmp_path):
    port = free_port()
    proc = subprocess.Popen(EMO + ["broker", "--engine", engine, "--port", str(port)], stderr=subprocess.PIPE)
    try:
        first = proc.stderr.readline()  # printed once the broker answers
        while b"listening" not in first and b"fetching" in first:
            first = proc.stderr.readline()
        assert f"listening on 127.0.0.1:{port}".encode() in first, first
        assert wait_for_port("127.0.0.1", port, 1)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert b"broker stopped" in err
    assert not wait_for_port("127.0.0.1", port, 0.5)


def test_broker_command_says_what_kafka_needs(tmp_path):
    env = {"PATH": str(tmp_path), "EMOSTREAM_CACHE_DIR": str(tmp_path / "cache")}  # no java, no mvn here
    p = run(["broker", "--engine", "kafka", "--port", str(free_port())], env=env)
    assert p.returncode == 2
    err = p.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "Java 17" in err, err


@pytest.mark.broker
def test_produce_then_consume(topics):
    env = {"EMOSTREAM_BROKER": topics.settings.broker}
    lines = b'{"id": "a", "text": "x"}\n{"id": "b", "text": "y"}\nraw line\n'
    p = run(["produce", topics.settings.input_topic], input=lines, env=env)
    assert p.returncode == 0 and b"produced 3" in p.stderr
    c = run(["consume", topics.settings.input_topic, "--max", "3", "--timeout", "10"], env=env)
    assert sorted(c.stdout.splitlines()) == sorted(lines.splitlines())


@pytest.mark.broker
def test_worker_stops_cleanly_on_sigterm(topics, start_worker):
    w = start_worker(topics)
    assert w.wait_for_log("Worker ready", 60), w.output()
    assert w.stop(signal.SIGTERM) == 0


@pytest.mark.broker
def test_demo_runs_end_to_end():
    p = run(["demo", "--count", "60"], timeout=240)
    out = p.stdout.decode()
    assert p.returncode == 0, out + p.stderr.decode()
    assert "60/60 enriched" in out and "4/4 dead-lettered" in out
