"""Text clean-up shared by training and inference, so the model sees at run time what it learnt on."""

from __future__ import annotations

import html
import re

_MENTION = re.compile(r"@\w{1,50}")
_URL = re.compile(r"https?://\S+|www\.\S+")
_SPACE = re.compile(r"\s+")

# A prefix this long holds far more than the 128 tokens the encoder reads; cutting first keeps the
# tokenizer's work bounded for a 100 KB post.
MAX_MODEL_CHARS = 2000


def normalize_tweet(text: str) -> str:
    """Unescape HTML entities, mask @mentions and URLs as TweetEval does (`@user`, `http`),
    collapse whitespace."""
    text = html.unescape(text[:MAX_MODEL_CHARS])
    text = _URL.sub("http", text)
    text = _MENTION.sub("@user", text)
    return _SPACE.sub(" ", text).strip()
