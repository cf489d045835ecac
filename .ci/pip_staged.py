"""Install a requirement one distribution at a time, to keep pip's peak disk use low.

torch's PyPI build brings about 3 GB of CUDA wheels that unpack to about 5 GB. A plain
`pip install` downloads every wheel before it unpacks any, so it needs both at once; on a CI
machine with little free disk that fails with "No space left on device". Here pip resolves the
whole set once (`--dry-run --report`, metadata only), then each missing distribution is installed
by itself with `--no-deps --no-cache-dir`, so at most one wheel sits on disk beside what is
already installed. A last plain `pip install` of the same requirement checks the result.

Usage: VENV/bin/python .ci/pip_staged.py REQUIREMENT...   (installs into that environment)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from importlib.metadata import distributions
from pathlib import Path

from packaging.utils import canonicalize_name

PIP = [sys.executable, "-m", "pip", "install", "-q"]


def main(requirements: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([*PIP, "--dry-run", "--ignore-installed", "--report", str(report), *requirements],
                       check=True)
        plan = json.loads(report.read_text())["install"]
    have = {canonicalize_name(d.metadata["Name"]): d.version for d in distributions()}
    for item in plan:
        if item.get("is_direct"):  # named by path or URL (the project itself): the last step takes it
            continue
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        if have.get(canonicalize_name(name)) == version:
            continue
        print(f"pip_staged: {name}=={version}", flush=True)
        subprocess.run([*PIP, "--no-deps", "--no-cache-dir", f"{name}=={version}"], check=True)
    subprocess.run([*PIP, "--no-cache-dir", *requirements], check=True)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__.strip().splitlines()[-1])
    try:
        main(sys.argv[1:])
    except subprocess.CalledProcessError as err:
        sys.exit(f"pip_staged: {' '.join(err.cmd)} failed with exit code {err.returncode}")
