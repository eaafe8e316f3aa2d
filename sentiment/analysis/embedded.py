"""MODEL_TYPE=embedded: the shipped MiniLM model, on the CPU, in worker threads."""

from __future__ import annotations

import gc
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .base import Analysis
from .bert import Tokenizer
from .encoder import ARTEFACT, MAX_TOKENS, encoder_path, load_default
from .labels import EMOTIONS, SENTIMENTS
from .local import LocalAnalyzer, usable_cores

log = logging.getLogger(__name__)

# Texts whose token shapes differ from each other and from the tracing example.
_TRACE_EXAMPLE = ["a short post", "a longer post, with several more words in it than the first one has"]
_TRACE_CHECKS = (["ok"], ["same length one", "same length two"], ["word " * 90, "x", "a b c d e f"])


def traced(model: nn.Module, encodings: Sequence[Any]) -> Any:
    """The model as one TorchScript graph: a forward pass without ~100 Python module calls (faster,
    docs/benchmarks.md). Traced on the first encoding and checked against eager on the others; a forward
    that branched on shapes would disagree, and stays eager."""
    import torch

    first, *checks = encodings
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about shapes read as ints: the checks decide
        graph = torch.jit.trace(  # type: ignore[no-untyped-call]
            model, (first["input_ids"], first["attention_mask"]), check_trace=False
        )
    with torch.inference_mode():
        for enc in checks:
            args = (enc["input_ids"], enc["attention_mask"])
            if not all(
                torch.allclose(a, b, atol=1e-5) for a, b in zip(model(*args), graph(*args), strict=True)
            ):
                log.warning(
                    "the traced model disagrees with eager on shape %s: running eager", tuple(args[0].shape)
                )
                return model
    return graph


class EmbeddedAnalyzer(LocalAnalyzer):
    def __init__(
        self, *, quantize: bool = True, threads: int = 0, chunk: int = 12, artefact: Path = ARTEFACT
    ) -> None:
        # chunk: texts per forward pass, after sorting by length: small chunks pad little (tweets vary
        # from 5 to 60 tokens) and balance the streams. threads: inference threads, each running one
        # chunk at a time on one core (0: one per usable core), since torch splits small matrix products
        # badly across threads. Measurements: docs/benchmarks.md, "Design measurements".
        super().__init__(chunk, streams=threads or usable_cores())
        self.artefact = artefact
        self.quantize = quantize
        self.name = "minilm-l6-lora-dual"
        self.max_tokens = MAX_TOKENS
        self._model: Any = None  # DualHead, or its TorchScript trace
        # One tokenizer for every inference thread: it is configured once, before any thread uses it, and
        # after that only encodes, which takes a shared borrow of it (tokenizers' "Already borrowed" comes
        # from reconfiguring one while another thread encodes). One per thread cost 6 MB each.
        self._tokenizer: Tokenizer | None = None

    def _load_model(self) -> None:
        import torch

        torch.set_num_threads(1)  # process-wide: the parallelism is in the streams
        model, meta = load_default(self.artefact)
        if self.quantize:
            with warnings.catch_warnings():
                # torch marks eager dynamic quantization deprecated in favour of torchao; it is still the
                # fastest CPU path here and needs no extra package.
                warnings.simplefilter("ignore")
                # Every Linear of the encoder, per channel; not the heads, a sliver of the compute whose
                # calibrated margins int8 would cost more accuracy (docs/benchmarks.md).
                quant = torch.ao.quantization
                model.encoder = quant.quantize_dynamic(  # type: ignore[no-untyped-call]
                    model.encoder,
                    {torch.nn.Linear: quant.per_channel_dynamic_qconfig},
                    dtype=torch.qint8,
                    inplace=True,  # a copy would hold the fp32 encoder twice while quantizing: +90 MB peak
                )
            model.encoder.embeddings.halve_word_vectors()
            # The fp32 Linear layers that quantization replaced sit in reference cycles: without a
            # collection now they held ~28 MB through the first 20 s of work (docs/benchmarks.md).
            gc.collect()
        self.name = f"{meta['name']}@{meta['version']}"
        self.max_tokens = int(meta.get("max_tokens", MAX_TOKENS))
        self._tokenizer = Tokenizer(encoder_path(), self.max_tokens)
        self._model = traced(model, [self._encode(texts) for texts in (_TRACE_EXAMPLE, *_TRACE_CHECKS)])

    def _encode(self, texts: Sequence[str]) -> Any:
        assert self._tokenizer is not None
        return self._tokenizer(list(texts))

    def _predict_chunk(self, texts: list[str]) -> list[Analysis]:
        import torch

        assert self._model is not None
        enc = self._encode(texts)
        with torch.inference_mode():
            s_logits, e_logits = self._model(enc["input_ids"], enc["attention_mask"])
            s_prob = torch.softmax(s_logits.float(), -1).tolist()
            e_prob = torch.softmax(e_logits.float(), -1).tolist()
        return [
            Analysis(dict(zip(SENTIMENTS, s, strict=True)), dict(zip(EMOTIONS, e, strict=True)), self.name)
            for s, e in zip(s_prob, e_prob, strict=True)
        ]
