"""MODEL_TYPE=embedded: the shipped MiniLM model, on the CPU, in worker threads."""

from __future__ import annotations

import threading
import warnings
from typing import Any

from .base import Analysis
from .encoder import MAX_TOKENS, DualHead, encoder_path, load_default
from .labels import EMOTIONS, SENTIMENTS
from .local import LocalAnalyzer


class EmbeddedAnalyzer(LocalAnalyzer):
    def __init__(self, *, quantize: bool = True, threads: int = 0, chunk: int = 64) -> None:
        super().__init__(chunk)
        self.quantize = quantize
        self.threads = threads
        self.name = "minilm-l6-lora-dual"
        self.max_tokens = MAX_TOKENS
        self._model: DualHead | None = None
        # Fast tokenizers are not thread-safe ("Already borrowed"): one per thread.
        self._local = threading.local()

    def _load_model(self) -> None:
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        model, meta = load_default()
        if self.quantize:
            with warnings.catch_warnings():
                # torch marks eager dynamic quantization deprecated in favour of torchao; it is still the
                # fastest CPU path here (int8 Linear: ~2.6x fp32 on 2 cores) and needs no extra package.
                warnings.simplefilter("ignore")
                model = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
                    model, {torch.nn.Linear}, dtype=torch.qint8
                )
        self.name = f"{meta['name']}@{meta['version']}"
        self.max_tokens = int(meta.get("max_tokens", MAX_TOKENS))
        self._model = model

    def _tokenizer(self) -> Any:
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(encoder_path()), local_files_only=True)
            self._local.tokenizer = tok
        return tok

    def _predict_chunk(self, texts: list[str]) -> list[Analysis]:
        import torch

        assert self._model is not None
        enc = self._tokenizer()(
            texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        with torch.inference_mode():
            s_logits, e_logits = self._model(enc["input_ids"], enc["attention_mask"])
            s_prob = torch.softmax(s_logits.float(), -1).tolist()
            e_prob = torch.softmax(e_logits.float(), -1).tolist()
        return [
            Analysis(dict(zip(SENTIMENTS, s, strict=True)), dict(zip(EMOTIONS, e, strict=True)), self.name)
            for s, e in zip(s_prob, e_prob, strict=True)
        ]
