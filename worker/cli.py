"""The ``emostream`` command line: parses arguments and dispatches, nothing more.

A mistake the user can fix — a wrong model name or path, a missing optional extra, a bad setting,
a broker that cannot be reached — ends the command with one line on stderr and exit code 2
(:func:`user_error`); a traceback means a bug. ``--log-level debug`` (or EMOSTREAM_LOG_LEVEL=debug)
shows the traceback in both cases.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import os
import re
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import orjson
import typer

from .settings import Settings, SettingsError, env_name, flag_name, settings_markdown

cli = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Enrich Kafka text events with emotion scores.")

ALL_FIELDS = tuple(Settings.model_fields)
MODEL_FIELDS = ("model", "cache_dir", "inference_threads", "inference_streams", "providers", "batch_max_tokens", "include_text", "score_decimals",
                "max_text_chars", "max_record_bytes", "log_level")
CONNECTION_FIELDS = ("broker", "security_protocol", "sasl_mechanism", "sasl_username", "sasl_password",
                     "ssl_cafile", "ssl_certfile", "ssl_keyfile", "ssl_key_password", "partitions",
                     "replication_factor", "log_level")
EXIT_USER_ERROR = 2


def _option(name: str) -> inspect.Parameter:
    field = Settings.model_fields[name]
    default = field.default
    shown = str(default).lower() if isinstance(default, bool) else default
    help_ = f"{field.description} [env {env_name(name)}; default: {shown!s}]"
    if field.annotation is bool:
        decl = typer.Option(None, f"{flag_name(name)}/--no-{name.replace('_', '-')}", help=help_, show_default=False)
        ann = Optional[bool]
    else:
        ann = Optional[field.annotation if field.annotation in (int, float) else str]
        decl = typer.Option(None, flag_name(name), help=help_, show_default=False)
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=decl, annotation=ann)


def with_settings(fields=ALL_FIELDS):
    """Give a command one flag per setting; it receives ``settings`` (flag > env > default)."""

    def deco(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(**kwargs):
            overrides = {k: kwargs.pop(k) for k in fields}
            return fn(settings=Settings.from_env(**overrides), **kwargs)  # SettingsError: one line (main)

        params = [p for p in sig.parameters.values() if p.name != "settings"]
        wrapper.__signature__ = sig.replace(parameters=params + [_option(n) for n in fields])
        return wrapper

    return deco


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def client_logging(level: str) -> None:
    """For the Kafka client commands: aiokafka's own error lines only with debug, since a failure
    ends the command with its one line anyway."""
    from .logging_setup import configure_logging

    configure_logging(level, library_level_override=None if level == "debug" else "critical")


# --------------------------------------------------------------------------------------------
@cli.command()
def broker(
    port: int = typer.Option(9092, "--port", "-p", help="Port on 127.0.0.1 (Kafka with --nodes 3: P, P+1, P+2)."),
    engine: str = typer.Option("tansu", "--engine", "-e",
                               help="tansu: embedded, in memory, instant. kafka: Apache Kafka (needs Java 17 and "
                                    "Maven; its jars are fetched into the cache on first use)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir",
                                            help="kafka: keep the log here; the same DIR and port restart the same "
                                                 "broker with its data (default: a temporary directory)."),
    nodes: int = typer.Option(1, "--nodes", help="kafka: 1, or 3 for a replicated KRaft cluster "
                                                 "(replication 3, min.insync.replicas 2)."),
) -> None:
    """Run a local broker until Ctrl-C or SIGTERM: embedded Tansu (default) or Apache Kafka."""
    import signal
    import threading

    from .broker import make_broker

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    b = make_broker(engine, port=port, data_dir=data_dir, nodes=nodes).start()  # BrokerError: one line (main)
    typer.echo(f"{engine} broker listening on {b.address} (EMOSTREAM_BROKER='{b.url}'); Ctrl-C stops it", err=True)
    try:
        while not stop.is_set() and b.alive():
            stop.wait(0.5)
    finally:
        b.stop()
    typer.echo("broker stopped", err=True)


@cli.command()
@with_settings()
def worker(settings: Settings) -> None:
    """Consume the input topic, enrich, publish; runs until SIGTERM/SIGINT."""
    if settings.processes != 1:
        from .processes import run_processes

        raise typer.Exit(run_processes(settings))
    from .runner import run_worker

    raise typer.Exit(run_worker(settings))


@cli.command()
@with_settings(MODEL_FIELDS)
def classify(
    texts: Optional[List[str]] = typer.Argument(None, help="Texts to score; none = one per stdin line."),
    table: bool = typer.Option(False, "--table", help="A readable table instead of JSON lines."),
    settings: Settings = None,
) -> None:
    """Score texts without Kafka: one enriched JSON record per text on stdout."""
    from .classify import classify_lines

    setup_logging(settings.log_level if settings.log_level != "info" else "warning")
    lines = texts if texts else (line.rstrip("\n") for line in sys.stdin)
    classify_lines(settings, lines, table=table)


@cli.command()
@with_settings(CONNECTION_FIELDS + ("input_topic",))
def produce(
    topic: Optional[str] = typer.Argument(None, help="Topic (default: the input topic)."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="JSON lines file (default: stdin)."),
    key_field: str = typer.Option("id", help="Use this field of each JSON line as the record key."),
    settings: Settings = None,
) -> None:
    """Send JSON lines (or any lines) from a file or stdin to a topic, one record per line."""
    from .kafka_io import produce as produce_records

    client_logging(settings.log_level)
    topic = topic or settings.input_topic
    stream = file.open("rb") if file else sys.stdin.buffer

    def records():
        for line in stream:
            line = line.rstrip(b"\r\n")
            if not line:
                continue
            key = None
            try:
                obj = orjson.loads(line)
                if isinstance(obj, dict) and obj.get(key_field) is not None:
                    key = str(obj[key_field]).encode()
            except orjson.JSONDecodeError:
                pass  # sent as it is: the worker dead-letters what it cannot read
            yield key, line

    n = asyncio.run(produce_records(settings, topic, records()))
    typer.echo(f"produced {n} records to {topic}", err=True)


@cli.command()
@with_settings(CONNECTION_FIELDS + ("output_topic",))
def consume(
    topic: Optional[str] = typer.Argument(None, help="Topic (default: the output topic)."),
    max_records: Optional[int] = typer.Option(None, "--max", "-n", help="Stop after N records."),
    timeout: float = typer.Option(10.0, "--timeout", "-t", help="Stop after S seconds with nothing new."),
    read_committed: bool = typer.Option(False, "--read-committed",
                                        help="Skip aborted transactions (for workers with delivery=exactly_once)."),
    settings: Settings = None,
) -> None:
    """Print a topic's records as JSON lines on stdout (from the beginning)."""
    from .kafka_io import consume as consume_records

    client_logging(settings.log_level)
    topic = topic or settings.output_topic

    async def run() -> int:
        n = 0
        async for rec in consume_records(settings, [topic], max_records, timeout, read_committed=read_committed):
            sys.stdout.buffer.write((rec.value or b"null") + b"\n")
            n += 1
        sys.stdout.flush()
        return n

    n = asyncio.run(run())
    typer.echo(f"consumed {n} records from {topic}", err=True)


@cli.command()
@with_settings(MODEL_FIELDS + ("batch_max", "batch_window_ms"))
def demo(
    count: int = typer.Option(300, "--count", help="Sample texts to send."),
    show: int = typer.Option(8, "--show", help="Enriched records to print."),
    settings: Settings = None,
) -> None:
    """Embedded broker + worker + sample traffic; prints results and a summary, then stops."""
    from .demo import run_demo

    setup_logging("warning")
    raise typer.Exit(run_demo(settings, count=count, show=show))


@cli.command("settings")
def settings_cmd(markdown: bool = typer.Option(False, "--markdown", help="The table of docs/settings.md."),
                 docs: Optional[Path] = typer.Option(None, "--update-docs", exists=True, dir_okay=False,
                                                     help="Rewrite the table in this file (docs/settings.md).")) -> None:
    """Print every setting (flag, environment variable, default)."""
    if docs is not None:
        from .settings import update_settings_table

        typer.echo("updated" if update_settings_table(docs) else "already up to date", err=True)
    elif markdown:
        typer.echo(settings_markdown())
    else:
        typer.echo(orjson.dumps(Settings.from_env().redacted(), option=orjson.OPT_INDENT_2).decode())


@cli.command()
def models() -> None:
    """List the registered model manifests."""
    from emostream.models.manifest import ManifestError, load_manifest, registered

    for name, path in registered().items():
        try:
            m = load_manifest(path)
            heads = ", ".join(f"{h.name}({h.kind})" for h in m.heads) or "no heads (embeddings only)"
            typer.echo(f"{name}: backbone {m.backbone.name} {m.backbone.version}, {heads}")
        except ManifestError as exc:
            typer.echo(f"{name}: unavailable: {exc}")


@cli.command()
def bench(
    data: Optional[Path] = typer.Option(None, "--data", help="GoEmotions .tsv or one text per line "
                                        "[default: ../shared/data/go_emotions/dev.tsv from the repo root]"),
    out: Path = typer.Option(Path("bench-results"), "--out", help="Where bench.json, bench.md and plots go."),
    quick: bool = typer.Option(False, "--quick", help="Fewer texts and variants: under a minute."),
    n: Optional[int] = typer.Option(None, "--n", min=1, help="Texts per stage [default: 1000, quick 150]."),
    model: Optional[str] = typer.Option(None, "--model", help="Model manifest name or path [default: settings]."),
    stages: Optional[str] = typer.Option(None, "--stages", help="Comma-separated subset of "
                                         "raw,pipeline,cache,end_to_end,naive,scaling,own_core [default: all]."),
    engine: str = typer.Option("tansu", "--engine", help="Broker(s) for the broker stages: tansu, kafka, or "
                               "tansu,kafka (each in turn; the report puts them side by side)."),
) -> None:
    """Throughput and latency: raw model, pipeline, end to end through a broker, naive agent,
    1 vs 2 workers, and the worker on a core of its own.

    The worker under test takes its settings from EMOSTREAM_* variables, so a lever is measured
    by running the bench with it set (e.g. EMOSTREAM_BATCH_MAX=256). Needs the bench extra."""
    from emostream.bench import INSTALL_HINT, missing_extra

    if (missing := missing_extra()) is not None:
        typer.echo(f"emostream bench needs the bench extra ({missing} is not installed): {INSTALL_HINT}", err=True)
        raise typer.Exit(1)
    from emostream.bench.plan import ALL_STAGES, BenchError, BenchOptions
    from emostream.bench.run import run_bench

    from .broker import BrokerError

    setup_logging("warning")
    chosen = tuple(x.strip() for x in stages.split(",") if x.strip()) if stages else ALL_STAGES
    if unknown := set(chosen) - set(ALL_STAGES):
        typer.echo(f"unknown stage(s) {sorted(unknown)}; choose from {', '.join(ALL_STAGES)}", err=True)
        raise typer.Exit(2)
    engines = tuple(x.strip() for x in engine.split(",") if x.strip())
    if not engines or set(engines) - {"tansu", "kafka"}:
        typer.echo(f"unknown engine(s) {engine!r}; choose tansu, kafka or tansu,kafka", err=True)
        raise typer.Exit(2)
    try:
        run_bench(BenchOptions(data=data, out=out, quick=quick, n=n, model=model, stages=chosen, engines=engines))
    except (BenchError, BrokerError) as exc:
        typer.echo(f"bench failed: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"wrote {out / 'bench.json'} and {out / 'bench.md'}", err=True)


@cli.command("eval")
def eval_cmd(
    data: Path = typer.Option(..., "--data", exists=True, dir_okay=False, help="GoEmotions-style .tsv (text, label ids)."),
    head: str = typer.Option("go_emotions", "--head", help="Head to score (go_emotions, ekman, sentiment, ...)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model manifest name or path (default: the model "
                                        "setting, EMOSTREAM_MODEL or its default)."),
    data_format: str = typer.Option("goemotions", "--format", help="goemotions: text + GoEmotions label ids, one "
                                    "head scored per label; check: a check set (id, language, one column per "
                                    "head, text), every head's top-label accuracy per language."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write per-label F1 bars to this PNG."),
) -> None:
    """Per-label and macro/weighted precision, recall and F1 of a head on labelled data
    (or, with --format check, per-language accuracy on a multilingual check set)."""
    from emostream.models.evaluate import EvalError, dumps, evaluate, evaluate_check, format_check_table, format_table
    from emostream.models.evaluate import plot as plot_report
    from emostream.models.manifest import ManifestError

    setup_logging("warning")
    if data_format not in ("goemotions", "check"):
        typer.echo(f"unknown --format {data_format!r}: goemotions or check", err=True)
        raise typer.Exit(2)
    settings = Settings.from_env()
    try:
        if data_format == "check":
            rep = evaluate_check(data, model=model or settings.model, cache_dir=settings.cache_dir)
        else:
            rep = evaluate(data, head=head, model=model or settings.model, cache_dir=settings.cache_dir)
    except (EvalError, ManifestError, ValueError) as exc:
        typer.echo(f"eval failed: {exc}", err=True)
        raise typer.Exit(1) from exc
    if data_format == "check":
        typer.echo(dumps(rep) if as_json else format_check_table(rep))
        return
    typer.echo(dumps(rep) if as_json else format_table(rep))
    if plot:
        typer.echo(f"wrote {plot_report(rep, plot)}", err=True)


@cli.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(ctx: typer.Context) -> None:
    """Fine-tune the backbone with the emotion heads (needs the `train` extra: torch).

    Options are those of `python -m emostream.models.training.finetune` (see `emostream train --help-train`)."""
    try:
        from emostream.models.training.finetune import main as finetune_main
    except ImportError as exc:
        typer.echo(f"training needs the train extra (pip install 'emostream[train]'): {exc}", err=True)
        raise typer.Exit(1) from exc
    args = ["--help" if a == "--help-train" else a for a in ctx.args]
    raise typer.Exit(finetune_main(args))


@cli.command()
@with_settings(("metrics_host", "metrics_port", "processes"))
def healthcheck(settings: Settings) -> None:
    """Exit 0 when the worker on this host answers /healthz with 200 (the container health check).

    With --processes N, every worker process is asked, each on its own port. Its event loop must
    have beaten within liveness_timeout_s: a stuck worker fails this check."""
    import urllib.error
    import urllib.request

    from .processes import allowed_cores, plan

    if not settings.metrics_port:
        typer.echo("unhealthy: metrics_port is 0, so the worker serves no /healthz to ask", err=True)
        raise typer.Exit(1)
    host = settings.metrics_host if settings.metrics_host not in ("", "0.0.0.0", "::") else "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    for child in plan(settings, allowed_cores()):
        url = f"http://{host}:{child.overrides.get('metrics_port', settings.metrics_port)}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=4) as resp:
                status, body = resp.status, resp.read()
        except urllib.error.HTTPError as exc:
            status, body = exc.code, exc.read()
        except OSError as exc:
            typer.echo(f"unhealthy: {url}: {getattr(exc, 'reason', exc)}", err=True)
            raise typer.Exit(1) from None
        if status != 200:
            typer.echo(f"unhealthy: {url} answered {status} {body.decode(errors='replace')}", err=True)
            raise typer.Exit(1)


# --------------------------------------------------------------------------------------------
def user_error(exc: BaseException) -> str | None:
    """One line for an error the user can fix (bad setting, model, extra, path, broker); None for a bug."""
    from .alerts import AlertRuleError
    from .broker import BrokerError
    from emostream.models.manifest import ManifestError

    if isinstance(exc, (SettingsError, ManifestError, AlertRuleError, BrokerError)):
        return str(exc)
    if isinstance(exc, ModuleNotFoundError) and exc.name and not exc.name.startswith("emostream"):
        return missing_module(exc.name)
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return str(exc)
    kafka_errors = sys.modules.get("aiokafka.errors")  # only set if a Kafka client ran
    if kafka_errors is not None and isinstance(exc, kafka_errors.KafkaConnectionError):
        return f"cannot reach the broker (check --broker / {env_name('broker')}): {exc}"
    if kafka_errors is not None and isinstance(exc, kafka_errors.KafkaError):
        return f"the broker refused: {type(exc).__name__}: {exc}"
    return None


# Import names whose distribution is called otherwise on PyPI.
DISTRIBUTIONS = {"yaml": "pyyaml", "sklearn": "scikit-learn", "PIL": "pillow"}


def missing_module(name: str) -> str:
    """What to install for a missing module: the extra of emostream that brings it, if one does."""
    from importlib.metadata import PackageNotFoundError, requires

    top = name.split(".")[0]
    dist = normalize(DISTRIBUTIONS.get(top, top))
    try:
        reqs = requires("emostream") or []
    except PackageNotFoundError:
        reqs = []
    extras = []
    for req in reqs:
        m = re.match(r"\s*([A-Za-z0-9._-]+)", req)
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", req)
        if m and normalize(m.group(1)) == dist:
            if extra is None:
                return f"the Python module {top!r} (a dependency of emostream) is missing: reinstall emostream"
            extras.append(extra.group(1))
    if extras:
        return f"this needs the Python module {top!r}, which is not installed: pip install 'emostream[{extras[0]}]'"
    return f"this needs the Python module {top!r}, which is not installed"


def normalize(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def debug_requested(args: Sequence[str]) -> bool:
    """--log-level debug on the command line, or EMOSTREAM_LOG_LEVEL=debug."""
    for i, arg in enumerate(args):
        if arg == "--log-level=debug" or (arg == "--log-level" and args[i + 1:i + 2] == ["debug"]):
            return True
    return os.environ.get(env_name("log_level"), "").lower() == "debug"


def main(argv: Sequence[str] | None = None) -> None:
    """The ``emostream`` entry point: a user's mistake ends in one line and exit code 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        cli(args=args, prog_name="emostream")
    except Exception as exc:  # noqa: BLE001 - sorted into a user's mistake or a bug (re-raised)
        message = user_error(exc)
        if message is None or debug_requested(args):
            raise
        typer.echo(f"emostream: error: {message}", err=True)
        sys.exit(EXIT_USER_ERROR)


if __name__ == "__main__":
    main()
