"""The run-time encoder (plain torch, `tokenizers`) against transformers' BERT, which training uses."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from sentiment.analysis import bert
from sentiment.analysis.encoder import encoder_path, load_default, load_encoder

pytestmark = pytest.mark.model

TEXTS = [
    "I love this!",
    "what a terrible, horrible day :( #fail",
    "ok",
    "word " * 200,  # truncated at 128 tokens
    "Ünïcödé façade — emoji 😀 @user http://x.co",
]


def test_tokens_hidden_states_and_logits_match_transformers() -> None:
    from transformers import AutoTokenizer

    folder = encoder_path()
    theirs = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)(
        TEXTS, padding=True, truncation=True, max_length=128, return_tensors="pt"
    )
    ours = bert.Tokenizer(folder, 128)(TEXTS)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    args = (ours["input_ids"], ours["attention_mask"])
    with torch.inference_mode():
        expected = load_encoder().eval()(input_ids=args[0], attention_mask=args[1]).last_hidden_state
        got = bert.load(folder)(*args)
        real = ours["attention_mask"].bool()  # padding positions are never pooled
        assert (expected - got)[real].abs().max() < 1e-4
        for a, b in zip(
            load_default(encoder=load_encoder())[0](*args), load_default()[0](*args), strict=True
        ):
            assert (a - b).abs().max() < 1e-4


def test_the_default_model_runs_without_importing_transformers() -> None:
    code = (
        "import sys, trio\n"
        "from sentiment.analysis.embedded import EmbeddedAnalyzer\n"
        "a = EmbeddedAnalyzer(threads=1)\n"
        "trio.run(a.load)\n"
        "[r] = trio.run(a.analyze, ['a fine day'])\n"
        "assert r.sentiment in ('negative', 'neutral', 'positive'), r\n"
        "print('transformers' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"
