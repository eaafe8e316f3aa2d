"""The encoder at run time: BERT in plain torch, and its tokenizer from `tokenizers`, without transformers.

Importing transformers' BERT costs a worker ~150 MB of memory for code the default model never runs
(docs/benchmarks.md). Module and parameter names follow transformers' `BertModel`, so the encoder's
safetensors file and the deltas that training (which does use transformers) writes load by name; a test
checks that both give the same hidden states."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn
from torch.nn import functional

from ..errors import ModelError


@attrs.frozen
class BertConfig:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def read(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text())
        if raw.get("model_type") != "bert" or raw.get("hidden_act", "gelu") != "gelu":
            raise ModelError(f"{path} is not the plain BERT encoder this code runs")
        return cls(**{f.name: raw[f.name] for f in attrs.fields(cls)})


def _uninitialised(rows: int, width: int) -> nn.Embedding:
    return nn.Embedding(rows, width, _weight=torch.empty(rows, width))


class _Embeddings(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        # Uninitialised (`_weight`): `load` assigns the file's. Initialising on the meta device runs
        # normal_'s Python meta kernel, whose import (sympy, mpmath: 822 modules) cost the worker 77 MB.
        self.word_embeddings = _uninitialised(c.vocab_size, c.hidden_size)
        self.position_embeddings = _uninitialised(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = _uninitialised(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # .float(): the word vectors may be stored in fp16 (`halve_word_vectors`); the sum is fp32.
        x = self.word_embeddings(input_ids).float() + self.position_embeddings(positions)
        x = x + self.token_type_embeddings.weight[0]  # one segment: token type 0 everywhere
        out: torch.Tensor = self.LayerNorm(x)
        return out

    def halve_word_vectors(self) -> None:
        """Store the word vectors, the largest tensor (30,522 × 384: 47 MB), in fp16 (23 MB).

        Under fp32 Linear layers the outputs move by under 1e-4. Under int8 ones, whose activation scales
        follow each chunk's values, a borderline text can change label, as it can between int8 and fp32:
        5% of TweetEval sentiment val labels changed, macro-recall 0.745 → 0.740, TweetEval emotion val
        macro-F1 0.824 → 0.827. Used only with int8, whose figures are measured with it."""
        self.word_embeddings.half()


class _SelfAttention(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.heads = c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        out = functional.scaled_dot_product_attention(
            split(self.query(x)), split(self.key(x)), split(self.value(x)), attn_mask=bias
        )
        return out.transpose(1, 2).reshape(b, n, d)


class _Output(nn.Module):
    """Projection, residual, LayerNorm: after attention and after the feed-forward layer."""

    def __init__(self, c: BertConfig, width: int) -> None:
        super().__init__()
        self.dense = nn.Linear(width, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.LayerNorm(self.dense(x) + residual)
        return out


class _Attention(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.self = _SelfAttention(c)
        self.output = _Output(c, c.hidden_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.output(self.self(x, bias), x)
        return out


class _Intermediate(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional.gelu(self.dense(x))


class _Layer(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.attention = _Attention(c)
        self.intermediate = _Intermediate(c)
        self.output = _Output(c, c.intermediate_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, bias)
        out: torch.Tensor = self.output(self.intermediate(x), x)
        return out


class _Layers(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))


class BertEncoder(nn.Module):
    """input_ids, attention_mask → the last hidden states (transformers' `last_hidden_state`)."""

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = _Embeddings(config)
        self.encoder = _Layers(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x: torch.Tensor = self.embeddings(input_ids)
        # Padding gets a large negative bias, as transformers does: its attention weight is 0.
        keep = attention_mask[:, None, None, :].to(x.dtype)
        bias = (1.0 - keep) * torch.finfo(x.dtype).min
        for layer in self.encoder.layer:
            x = layer(x, bias)
        return x


def owned_tensors(path: Path, wanted: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """The file's `wanted` tensors, each copied out of its own memory map of the file.

    safetensors hands out tensors that share one map of the file: a model built on them kept the whole
    file resident (85 of its 90 MB) after quantization had replaced most of it, and the merged deltas
    were copies-on-write inside that map. One map per tensor, closed once it is copied, bounds the extra
    memory while loading to the tensor being copied."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = [key for key in f.keys() if wanted(key)]  # noqa: SIM118 - safe_open is no dict
    tensors = {}
    for key in keys:
        with safe_open(str(path), framework="pt") as f:
            tensors[key] = f.get_tensor(key).clone()
    return tensors


def load(folder: Path) -> BertEncoder:
    """The encoder of `folder` (config.json, model.safetensors), every weight present and used.

    Built without weights (the meta device) and given the file's tensors as they are (`assign`): one
    copy of the weights in memory, not three (random initial ones, the file's, the module's)."""
    with torch.device("meta"):
        model = BertEncoder(BertConfig.read(folder / "config.json"))
    # Not parameters: position_ids is a buffer transformers keeps; the pooler is unused by mean pooling.
    weights = owned_tensors(
        folder / "model.safetensors",
        lambda k: k != "embeddings.position_ids" and not k.startswith("pooler."),
    )
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    if missing or unexpected:
        raise ModelError(f"the encoder in {folder} does not fit: missing {missing}, unexpected {unexpected}")
    model.eval()
    return model


class Tokenizer:
    """The encoder's own tokenizer (tokenizer.json), padded and truncated for a batch."""

    def __init__(self, folder: Path, max_tokens: int) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self._tok = RustTokenizer.from_file(str(folder / "tokenizer.json"))
        self._tok.enable_truncation(max_length=max_tokens)
        pad = self._tok.token_to_id("[PAD]")
        self._tok.enable_padding(pad_id=pad, pad_token="[PAD]")

    def __call__(self, texts: list[str]) -> dict[str, Any]:
        encodings = self._tok.encode_batch(texts)
        return {
            "input_ids": torch.tensor([e.ids for e in encodings], dtype=torch.long),
            "attention_mask": torch.tensor([e.attention_mask for e in encodings], dtype=torch.long),
        }
