"""One configuration surface: defaults, env, flags, and the table of docs/settings.md kept in sync."""

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from emostream.worker.cli import cli
from emostream.worker.settings import Settings, env_name, flag_name, settings_markdown

SETTINGS_DOC = Path(__file__).resolve().parents[1] / "docs" / "settings.md"


def test_contract_defaults():
    s = Settings.from_env(environ={})
    assert s.broker == "kafka://127.0.0.1:9092"
    assert (s.input_topic, s.output_topic, s.dlq_topic) == ("texts", "texts.enriched", "texts.dlq")
    assert (s.batch_max, s.batch_window_ms) == (256, 50)
    assert s.bootstrap_servers == ["127.0.0.1:9092"]


def test_env_then_override():
    env = {"EMOSTREAM_BATCH_MAX": "8", "EMOSTREAM_INCLUDE_TEXT": "true", "EMOSTREAM_BROKER": "kafka://a:1;kafka://b:2"}
    s = Settings.from_env(environ=env)
    assert s.batch_max == 8 and s.include_text is True and s.bootstrap_servers == ["a:1", "b:2"]
    assert Settings.from_env(environ=env, batch_max=3).batch_max == 3


def test_invalid_values_fail_loudly():
    with pytest.raises(ValueError):
        Settings.from_env(environ={"EMOSTREAM_BATCH_MAX": "0"})
    with pytest.raises(ValueError):
        Settings.from_env(environ={"EMOSTREAM_INPUT_FORMAT": "xml"})


def test_secrets_redacted():
    s = Settings.from_env(environ={}, sasl_password="hunter2")
    assert s.redacted()["sasl_password"] == "***"
    assert "hunter2" not in str(s.redacted())


def test_every_setting_is_a_worker_flag():
    out = CliRunner().invoke(cli, ["worker", "--help"], env={"COLUMNS": "300"}).output
    for name in Settings.model_fields:
        assert flag_name(name) in out, name


def test_docs_table_in_sync():
    text = SETTINGS_DOC.read_text()
    assert settings_markdown() in text, \
        "docs/settings.md is stale: run `emostream settings --update-docs docs/settings.md`"
    for name in Settings.model_fields:
        assert env_name(name) in text


def test_update_docs_rewrites_only_the_table(tmp_path):
    doc = tmp_path / "settings.md"
    doc.write_text("# Settings\n\nintro\n\n<!-- settings:begin -->\n| old |\n<!-- settings:end -->\n\nafter\n")
    runner = CliRunner()
    first = runner.invoke(cli, ["settings", "--update-docs", str(doc)])
    assert first.exit_code == 0 and "updated" in first.output
    text = doc.read_text()
    assert text.startswith("# Settings\n\nintro\n\n<!-- settings:begin -->\n" + settings_markdown())
    assert text.endswith("<!-- settings:end -->\n\nafter\n") and "| old |" not in text
    again = runner.invoke(cli, ["settings", "--update-docs", str(doc)])
    assert again.exit_code == 0 and "already up to date" in again.output and doc.read_text() == text


def test_settings_command_prints_json(monkeypatch):
    monkeypatch.setenv("EMOSTREAM_SASL_PASSWORD", "secret")
    out = CliRunner().invoke(cli, ["settings"]).output
    assert '"sasl_password": "***"' in out and "secret" not in out
