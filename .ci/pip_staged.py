"""Install a requirement one distribution at a time, to keep pip's peak disk use low.

torch's PyPI build brings about 3 GB of CUDA wheels that unpack to about 5 GB. A plain
`pip install` downloads every wheel before it unpacks any, so it needs both at once; on a CI
machine with little free disk that fails with "No space left on device". Here pip resolves the
whole set once (`--dry-run --report`, metadata only), then each missing distribution is installed
by itself with `--no-deps --no-cache-dir`, so at most one wheel sits on disk beside what is
already installed. A last plain `pip install` of the same requirement checks the result.

Usage: python .ci/pip_staged.py PIP REQUIREMENT...
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

LIST_INSTALLED = (
    "import json, importlib.metadata as m\n"
    "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))\n"
)


def canonical(name: str) -> str:
    """PEP 503 name: case and runs of -_. do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(python: str) -> dict[str, str]:
    """Versions installed in `python`'s environment, by canonical name."""
    out = subprocess.run([python, "-c", LIST_INSTALLED], capture_output=True, text=True, check=True)
    return {canonical(name): version for name, version in json.loads(out.stdout).items()}


def main(pip: str, requirements: list[str]) -> None:
    python = str(Path(pip).with_name("python"))
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(
            [pip, "install", "-q", "--dry-run", "--ignore-installed", "--report", str(report),
             *requirements],
            check=True,
        )
        plan = json.loads(report.read_text())["install"]
    have = installed(python)
    for item in plan:
        if item["download_info"]["url"].startswith("file:"):  # the project: the last step takes it
            continue
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        if have.get(canonical(name)) == version:
            continue
        print(f"pip_staged: {name}=={version}", flush=True)
        subprocess.run(
            [pip, "install", "-q", "--no-deps", "--no-cache-dir", f"{name}=={version}"], check=True
        )
    subprocess.run([pip, "install", "-q", "--no-cache-dir", *requirements], check=True)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__.strip().splitlines()[-1])
    try:
        main(sys.argv[1], sys.argv[2:])
    except subprocess.CalledProcessError as err:
        sys.exit(f"pip_staged: {' '.join(err.cmd)} failed with exit code {err.returncode}")
