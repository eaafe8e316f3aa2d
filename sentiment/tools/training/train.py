"""Multi-task training of the default model: LoRA deltas on every encoder Linear, two heads.

Reproducible from a seed (single-threaded data order, seeded init and dropout). Model selection and the
per-class bias calibration use only the validation splits; the test splits are never read here.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ...analysis.encoder import ARTEFACT, DualHead, encoder_path, load_encoder, lora_targets
from ...analysis.labels import EMOTIONS, SENTIMENTS
from . import data


@attrs.frozen
class TrainConfig:
    data_dir: Path
    output: Path = ARTEFACT
    seed: int = 13
    epochs: int = 3
    batch_size: int = 32
    lr: float = 8e-4
    lora_rank: int = 16
    lora_alpha: float = 32.0
    frozen_layers: int = 2  # lower layers kept as they are; their output is computed once and cached
    max_tokens: int = 64
    threads: int = 2
    limit: int = 0  # >0: use at most this many examples per task (smoke runs)
    # What TweetEval's `optimism` tweets are trained as (None: left out). Chosen on validation: see README.
    optimism: str | None = "joy"
    tweet_repeats: int = 1  # TweetEval emotion tweets appear this many times per epoch
    balanced: bool = False  # sentiment loss weighted by inverse class frequency
    # Tweets of the latest training year held out for selection beside TweetEval val (0: none).
    holdout: int = 0
    # Weight of a sentiment loss on the emotion examples, with the sentiment their emotion implies
    # (`data.EMOTION_SENTIMENT`): Reddit comments and later tweets beside the 2013–2016 sentiment files.
    emotion_sentiment: float = 0.0


class LoRALinear(nn.Module):
    """y = W x + (alpha/r) · B A x with W frozen; B starts at zero so training starts from the encoder."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.A = nn.Parameter(torch.empty(rank, base.in_features))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.base(x) + (self.dropout(x) @ self.A.T @ self.B.T) * self.scale
        return out


def attach_lora(model: DualHead, rank: int, alpha: float, frozen_layers: int) -> dict[str, LoRALinear]:
    for p in model.encoder.parameters():
        p.requires_grad_(False)
    wrapped = {}
    for name, linear in lora_targets(model.encoder).items():
        if int(name.split(".layer.")[1].split(".")[0]) < frozen_layers:
            continue
        parent_name, _, child = name.rpartition(".")
        wrapper = LoRALinear(linear, rank, alpha)
        setattr(model.encoder.get_submodule(parent_name), child, wrapper)
        wrapped[name] = wrapper
    return wrapped


def _batches(examples: data.Examples, size: int, rng: random.Random) -> list[list[int]]:
    """Length-bucketed batches: shuffle, sort within chunks of 50 batches, then shuffle the batches."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    chunk = size * 50
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: len(examples.texts[i]))
        batches.extend(part[i : i + size] for i in range(0, len(part), size))
    rng.shuffle(batches)
    return batches


class Features:
    """Output of the frozen lower layers for every example, computed once (fp16, unpadded)."""

    def __init__(self, model: DualHead, tokenizer: Any, texts: tuple[str, ...], cfg: TrainConfig) -> None:
        self.model = model
        self.frozen = cfg.frozen_layers
        self.hidden: list[torch.Tensor] = [torch.empty(0)] * len(texts)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        model.eval()
        with torch.inference_mode():
            for start in tqdm(
                range(0, len(order), 128), desc="caching lower layers", unit="batch", mininterval=10
            ):
                idx = order[start : start + 128]
                enc = tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=cfg.max_tokens,
                    return_tensors="pt",
                )
                h = self._run(
                    model.encoder.embeddings(input_ids=enc["input_ids"]),
                    enc["attention_mask"],
                    0,
                    self.frozen,
                )
                for row, i in enumerate(idx):
                    self.hidden[i] = h[row, : int(enc["attention_mask"][row].sum())].half().clone()

    def _run(self, h: torch.Tensor, mask: torch.Tensor, first: int, last: int) -> torch.Tensor:
        enc = self.model.encoder
        # Private helper of transformers' BertModel, used here only: it builds the mask its layers expect.
        full_mask, _ = enc._create_attention_masks(
            attention_mask=mask,
            encoder_attention_mask=None,
            embedding_output=h,
            encoder_hidden_states=None,
            cache=None,
        )
        for layer in enc.encoder.layer[first:last]:
            out = layer(h, attention_mask=full_mask)
            h = out[0] if isinstance(out, tuple) else out
        return h

    def logits(self, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Upper layers, pooling and heads on cached lower-layer output: the same function as `DualHead`."""
        parts = [self.hidden[i] for i in idx]
        length = max(p.shape[0] for p in parts)
        h = torch.zeros(len(parts), length, parts[0].shape[1])
        mask = torch.zeros(len(parts), length, dtype=torch.long)
        for row, p in enumerate(parts):
            h[row, : p.shape[0]] = p.float()
            mask[row, : p.shape[0]] = 1
        h = self._run(h, mask, self.frozen, len(self.model.encoder.encoder.layer))
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.model.sentiment(pooled), self.model.emotion(pooled)

    def predict(self, n_examples: int) -> tuple[np.ndarray, np.ndarray]:
        self.model.eval()
        order = sorted(range(n_examples), key=lambda i: self.hidden[i].shape[0])
        sent, emo = [], []
        with torch.inference_mode():
            for start in range(0, n_examples, 256):
                s, e = self.logits(order[start : start + 256])
                sent.append(s)
                emo.append(e)
        inverse = np.argsort(order)
        return torch.cat(sent).numpy()[inverse], torch.cat(emo).numpy()[inverse]


def calibrate(logits: np.ndarray, objective: Callable[[np.ndarray], float], rounds: int = 3) -> np.ndarray:
    """Per-class additive offsets that maximise `objective(predictions)` on validation (coordinate ascent)."""
    offsets = np.zeros(logits.shape[1], dtype=np.float32)
    grid = np.linspace(-2.0, 2.0, 41)

    def value(o: np.ndarray) -> float:
        return objective((logits + o).argmax(1))

    best = value(offsets)
    for _ in range(rounds):
        for c in range(1, logits.shape[1]):  # class 0 stays the reference
            for g in grid:
                trial = offsets.copy()
                trial[c] = g
                v = value(trial)
                if v > best + 1e-9:
                    best, offsets = v, trial
    return offsets


def sent_recalls(parts: Sequence[data.Examples], predicted: np.ndarray) -> list[float]:
    """Macro-recall of each of `parts`, on their predictions concatenated in that order."""
    ends = np.cumsum([len(part) for part in parts])
    return [
        data.scores(part.labels, chunk, len(SENTIMENTS))["macro_recall"]
        for part, chunk in zip(parts, np.split(predicted, ends[:-1]), strict=True)
    ]


def sent_scores(*parts: data.Examples) -> Callable[[np.ndarray], float]:
    """Mean macro-recall over `parts` (`sent_recalls`)."""
    return lambda predicted: float(np.mean(sent_recalls(parts, predicted)))


def emotion_scores(reddit: data.Examples, tweets: data.Examples) -> Callable[[np.ndarray], float]:
    """Mean of GoEmotions macro-F1 (six classes) and TweetEval macro-F1 (the three it shares with us), on
    predictions for `reddit` then `tweets`, concatenated."""
    n = len(reddit)

    def value(predicted: np.ndarray) -> float:
        r = data.scores(reddit.labels, predicted[:n], len(EMOTIONS))["macro_f1"]
        t = data.scores(tweets.labels, predicted[n:], len(EMOTIONS), data.TWEET_EMOTIONS)["macro_f1"]
        return (r + t) / 2

    return value


def train(cfg: TrainConfig) -> dict[str, Any]:
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(encoder_path()), local_files_only=True)
    sent_val = data.tweeteval_sentiment(cfg.data_dir, "val")
    held = data.semeval_holdout(cfg.data_dir, cfg.holdout, cfg.seed, exclude=sent_val.texts)
    sent_train = data.semeval_train(cfg.data_dir, exclude=sent_val.texts + held.texts)
    emo_train = data.goemotions(cfg.data_dir, "train")
    emo_val = data.goemotions(cfg.data_dir, "dev")
    tweet_train = data.tweeteval_emotion(cfg.data_dir, "train", optimism=cfg.optimism)
    # Selection scores what the goal scores: tweets labelled anger, joy or sadness.
    tweet_val = data.tweeteval_emotion(cfg.data_dir, "val")
    if cfg.limit:
        sent_train, emo_train, tweet_train, sent_val, held, emo_val, tweet_val = (
            data.Examples(ex.texts[: cfg.limit], ex.labels[: cfg.limit])
            for ex in (sent_train, emo_train, tweet_train, sent_val, held, emo_val, tweet_val)
        )
    # Sentiment selection sets: TweetEval val, then the held-out year when there is one.
    sent_sel = (sent_val, held) if len(held) else (sent_val,)
    emo_train = data.Examples(
        emo_train.texts + tweet_train.texts * cfg.tweet_repeats,
        emo_train.labels + tweet_train.labels * cfg.tweet_repeats,
    )

    model = DualHead(load_encoder())
    features = {
        name: Features(model, tokenizer, ex.texts, cfg)
        for name, ex in (
            ("sentiment", sent_train),
            ("emotion", emo_train),
            *((f"sent_val{i}", ex) for i, ex in enumerate(sent_sel)),
            ("emo_val", emo_val),
            ("tweet_val", tweet_val),
        )
    }
    wrapped = attach_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.frozen_layers)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    rng = random.Random(cfg.seed)
    steps_per_epoch = math.ceil(len(sent_train) / cfg.batch_size) + math.ceil(len(emo_train) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, total // 16)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, max(0.0, (total - s) / max(1, total - warmup)))
    )
    loss_fn = nn.CrossEntropyLoss()
    sent_loss = loss_fn
    implied_loss = nn.CrossEntropyLoss(ignore_index=data.NO_SENTIMENT)  # surprise implies none
    implied = data.implied_sentiment(emo_train.labels)
    if cfg.balanced:
        counts = np.bincount(sent_train.labels, minlength=len(SENTIMENTS)).astype(np.float32)
        weights = torch.from_numpy(counts.sum() / (len(SENTIMENTS) * np.maximum(counts, 1.0)))
        sent_loss = nn.CrossEntropyLoss(weight=weights)
    best: dict[str, Any] = {"score": -1.0}
    history: list[dict[str, Any]] = []
    started = time.monotonic()

    def save() -> dict[str, Any]:
        """The best epoch so far, written at once: a run cut short still leaves its best artefact."""
        from safetensors.torch import save_file

        meta = {
            "name": "minilm-l6-lora-dual",
            "version": time.strftime("%Y.%m.%d.%H%M"),  # two models of one day must not share a name
            "lora_rank": cfg.lora_rank,
            "lora_alpha": cfg.lora_alpha,
            "frozen_layers": cfg.frozen_layers,
            "max_tokens": cfg.max_tokens,
            "encoder_sha256": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            "sentiment_labels": list(SENTIMENTS),
            "emotion_labels": list(EMOTIONS),
            "seed": cfg.seed,
            "epochs": cfg.epochs,
            "lr": cfg.lr,  # with seed, epochs and batch_size: what a rerun needs to reproduce this artefact
            "batch_size": cfg.batch_size,
            "optimism": cfg.optimism,
            "tweet_repeats": cfg.tweet_repeats,
            "balanced": cfg.balanced,
            "holdout": cfg.holdout,
            "emotion_sentiment": cfg.emotion_sentiment,
            "best_epoch": best["epoch"],
            "history": history,
            "train_examples": {
                "sentiment": len(sent_train),
                "emotion": len(emo_train),
                "of_which_tweets": len(tweet_train) * cfg.tweet_repeats,
            },
            "train_seconds": round(time.monotonic() - started),
        }
        cfg.output.parent.mkdir(parents=True, exist_ok=True)
        save_file(best["tensors"], str(cfg.output), metadata={"sentiment": json.dumps(meta)})
        return meta

    for epoch in range(cfg.epochs):
        model.train()
        jobs = [("sentiment", b) for b in _batches(sent_train, cfg.batch_size, rng)]
        jobs += [("emotion", b) for b in _batches(emo_train, cfg.batch_size, rng)]
        rng.shuffle(jobs)
        bar = tqdm(jobs, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="batch", mininterval=5)
        for task, idx in bar:
            examples = sent_train if task == "sentiment" else emo_train
            gold = torch.tensor([examples.labels[i] for i in idx])
            s_logits, e_logits = features[task].logits(idx)
            if task == "sentiment":
                loss = sent_loss(s_logits, gold)
            else:
                loss = loss_fn(e_logits, gold)
                if cfg.emotion_sentiment:
                    implied_gold = torch.tensor([implied[i] for i in idx])
                    # A batch of surprise alone has nothing to add (and its mean loss would be 0/0).
                    if bool((implied_gold != data.NO_SENTIMENT).any()):
                        loss = loss + cfg.emotion_sentiment * implied_loss(s_logits, implied_gold)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        s_val = np.concatenate(
            [features[f"sent_val{i}"].predict(len(ex))[0] for i, ex in enumerate(sent_sel)]
        )
        _, e_val = features["emo_val"].predict(len(emo_val))
        _, t_val = features["tweet_val"].predict(len(tweet_val))
        s_off = calibrate(s_val, sent_scores(*sent_sel))
        recalls = sent_recalls(sent_sel, (s_val + s_off).argmax(1))
        # One set of emotion offsets serves Reddit and tweets alike: the mean of both macro-F1s.
        e_off = calibrate(np.concatenate([e_val, t_val]), emotion_scores(emo_val, tweet_val))
        e_pred, t_pred = (e_val + e_off).argmax(1), (t_val + e_off).argmax(1)
        row = {
            "epoch": epoch + 1,
            **dict(
                zip(
                    ("val_sentiment_macro_recall", "heldout_year_sentiment_macro_recall"),
                    recalls,
                    strict=False,
                )
            ),
            "val_emotion_macro_f1": data.scores(emo_val.labels, e_pred, len(EMOTIONS))["macro_f1"],
            **{
                f"val_tweet_emotion_{k}": v
                for k, v in data.scores(tweet_val.labels, t_pred, len(EMOTIONS), data.TWEET_EMOTIONS).items()
                if k != "macro_recall"
            },
        }
        history.append(row)
        tqdm.write(json.dumps(history[-1]))
        score = float(np.mean(recalls)) + emotion_scores(emo_val, tweet_val)(np.concatenate([e_pred, t_pred]))
        if score > best["score"]:
            best = {"score": score, "epoch": epoch + 1, "tensors": _export(model, wrapped, s_off, e_off)}
            save()
    return save()


def _export(
    model: DualHead, wrapped: dict[str, LoRALinear], s_off: np.ndarray, e_off: np.ndarray
) -> dict[str, torch.Tensor]:
    """The deltas in fp16 (merged at load, so their precision only nudges W) and the calibrated heads."""
    tensors = {}
    for name, mod in wrapped.items():
        tensors[f"lora.{name}.A"] = mod.A.detach().half().contiguous()
        tensors[f"lora.{name}.B"] = mod.B.detach().half().contiguous()
    tensors["sentiment.weight"] = model.sentiment.weight.detach().clone()
    tensors["sentiment.bias"] = model.sentiment.bias.detach() + torch.from_numpy(s_off)
    tensors["emotion.weight"] = model.emotion.weight.detach().clone()
    tensors["emotion.bias"] = model.emotion.bias.detach() + torch.from_numpy(e_off)
    return tensors
