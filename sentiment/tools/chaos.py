"""The chaos run behind scripts/chaos.py: real workers, killed and restarted, servers restarted, then the
invariants checked. It starts its own Redis and PostgreSQL and touches nothing it did not start."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import attrs
import psycopg
import redis

from ..config import Settings
from ..deadletter import decode
from ..synthetic import synthetic_posts
from .throwaway import ThrowawayPostgres, ThrowawayRedis, make_workdir

log = logging.getLogger("sentiment.chaos")
STREAM = "chaos"
GROUP = "sentiment_workers"


@attrs.frozen
class ChaosConfig:
    posts: int = 2000
    workers: int = 3
    kills: int = 3
    terms: int = 2
    duration_s: float = 40.0
    seed: int = 1
    model: str = "noop"
    batch_size: int = 50
    invalid_every: int = 97  # every Nth post is invalid (bad created_at): it must end dead-lettered


class Publisher(threading.Thread):
    """Publishes at an even pace over the run with explicit entry IDs, so a chunk resent after a Redis
    restart cannot add a second copy: Redis refuses an ID it already has."""

    def __init__(self, url: str, cfg: ChaosConfig) -> None:
        super().__init__(daemon=True)
        self.url, self.cfg = url, cfg
        self.published: list[str] = []
        self.invalid: set[str] = set()  # post_ids published invalid on purpose
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._publish()
        except BaseException as exc:
            self.error = exc

    def _publish(self) -> None:
        client = redis.Redis.from_url(self.url, socket_timeout=5)
        posts = list(synthetic_posts(self.cfg.posts, seed=self.cfg.seed, prefix="chaos"))
        for i, post in enumerate(posts):
            if self.cfg.invalid_every and i % self.cfg.invalid_every == 5:
                post["created_at"] = "not a date"
                self.invalid.add(post["post_id"])
        chunk = 100
        pause = self.cfg.duration_s * 0.7 / max(1, len(posts) / chunk)
        last_ms = 0
        for start in range(0, len(posts), chunk):
            part = posts[start : start + chunk]
            last_ms = max(int(time.time() * 1000), last_ms + 1)
            ids = [f"{last_ms}-{k}" for k in range(len(part))]
            while True:
                try:
                    pipe = client.pipeline(transaction=False)
                    for entry_id, post in zip(ids, part, strict=True):
                        pipe.xadd(STREAM, post, id=entry_id)  # type: ignore[arg-type]
                    for result in pipe.execute(raise_on_error=False):
                        if isinstance(result, Exception) and "equal or smaller" not in str(result):
                            raise result
                    break
                except (redis.ConnectionError, redis.TimeoutError):
                    time.sleep(0.2)  # Redis is restarting: resend the same IDs
            self.published.extend(p["post_id"] for p in part)
            time.sleep(pause)
        client.close()


class Fleet:
    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env, self.cwd = env, cwd
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.started = 0
        self.logs = cwd / "logs"
        self.logs.mkdir(exist_ok=True)

    def start(self) -> None:
        self.started += 1
        name = f"chaos-w{self.started}"
        with (self.logs / f"{name}.log").open("wb") as out:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "sentiment", "run"],
                cwd=self.cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**self.env, "CONSUMER_NAME": name},
            )

    def alive(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is None]

    def signal_one(self, rng: random.Random, sig: signal.Signals) -> str | None:
        alive = self.alive()
        if not alive:
            return None
        name = rng.choice(alive)
        self.procs[name].send_signal(sig)
        if sig == signal.SIGTERM:
            self.procs[name].wait(timeout=60)
        return name

    def stop_all(self) -> None:
        for name in self.alive():
            self.procs[name].send_signal(signal.SIGTERM)
        for p in self.procs.values():
            p.wait(timeout=60)


def run_chaos(cfg: ChaosConfig) -> dict[str, Any]:
    rng = random.Random(cfg.seed)
    work = make_workdir("sentiment-chaos-")
    rds, pg = ThrowawayRedis(work / "redis"), ThrowawayPostgres(work / "pg")
    rds.start()
    pg.start()
    settings = Settings(
        database_url=pg.url,
        redis_url=rds.url,
        stream=STREAM,
        group=GROUP,
        model_type=cfg.model,
        metrics_port=0,
        batch_size=cfg.batch_size,
        block_ms=500,
        claim_min_idle_ms=3000,
        reclaim_interval_ms=1000,
        shutdown_grace_s=5.0,
    )
    base = {k: v for k, v in os.environ.items() if k not in Settings.env_names()}
    base["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])  # the checkout
    fleet = Fleet(base | settings.to_env(), work)  # each worker gets its own CONSUMER_NAME
    try:
        for _ in range(cfg.workers):
            fleet.start()
        publisher = Publisher(rds.url, cfg)
        publisher.start()
        events = ["kill"] * cfg.kills + ["term"] * cfg.terms + ["redis", "postgres"]
        rng.shuffle(events)
        gap = cfg.duration_s / (len(events) + 1)
        counts = Counter[str]()
        for event in events:
            time.sleep(gap * rng.uniform(0.5, 1.5))
            if event in ("kill", "term"):
                sig = signal.SIGKILL if event == "kill" else signal.SIGTERM
                if fleet.signal_one(rng, sig):
                    counts[event] += 1
                fleet.start()
            elif event == "redis":
                rds.restart(down_for=2.0)
                counts["redis"] += 1
            else:
                pg.restart(down_for=2.0)
                counts["postgres"] += 1
            log.info("%s (%d workers alive)", event, len(fleet.alive()))
        publisher.join()
        if publisher.error:
            raise publisher.error
        fleet.stop_all()
        drain = subprocess.run(
            [sys.executable, "-m", "sentiment", "run", "--drain"],
            cwd=work,
            capture_output=True,
            timeout=600,
            env=base
            | attrs.evolve(
                settings, consumer="chaos-drain", claim_min_idle_ms=100, reclaim_interval_ms=100
            ).to_env(),
            check=False,
        )
        if drain.returncode != 0:
            raise RuntimeError(f"the drain failed: {drain.stderr.decode()[-2000:]}")
        return _check(rds.url, pg.url, publisher.published, publisher.invalid) | {
            "kills": counts["kill"],
            "terms": counts["term"],
            "redis_restarts": counts["redis"],
            "postgres_restarts": counts["postgres"],
            "workers_started": fleet.started,
        }
    finally:
        for p in fleet.procs.values():
            if p.poll() is None:
                p.kill()
        rds.stop()
        pg.stop("immediate")


def _check(redis_url: str, dsn: str, published: list[str], invalid: set[str]) -> dict[str, Any]:
    client = redis.Redis.from_url(redis_url)
    letters: Any = client.xrange(f"{STREAM}:dead")
    dead = Counter(decode(i.decode(), f).original.get(b"post_id", b"").decode() for i, f in letters)
    pending = int(client.xpending(STREAM, GROUP)["pending"])
    client.close()
    with psycopg.connect(dsn) as conn:
        rows = Counter(
            {
                r[0]: int(r[1])
                for r in conn.execute("SELECT post_id, count(*) FROM sentiment_analysis GROUP BY post_id")
            }
        )
    ids = set(published)
    return {
        "published": len(ids),
        "rows": sum(rows.values()),
        "dead_lettered": sum(dead.values()),
        "lost": sum(1 for p in ids if rows[p] + dead[p] == 0),
        "duplicates": sum(1 for p in ids if rows[p] + dead[p] > 1),
        "pending": pending,
        # The dead-letter stream must hold exactly the posts published invalid: never a valid one that a
        # kill or an outage pushed there.
        "invalid_published": len(invalid),
        "valid_dead_lettered": sum(1 for p in dead if p not in invalid),
        "invalid_not_dead_lettered": sum(1 for p in invalid if dead[p] != 1),
    }
