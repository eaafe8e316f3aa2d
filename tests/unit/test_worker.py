"""The pipeline's logic on in-memory fakes, under trio's autojump clock (no real sleeps)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from sentiment.config import Settings
from sentiment.entries import Claimed, Entry, entry_size, read_count
from sentiment.errors import ModelError
from sentiment.parts import Parts
from sentiment.processor import SOLO_CRASHES
from sentiment.wiring import build_worker
from sentiment.worker import Worker

from ..support.fakes import FakeAnalyzer, FakeGroup, FakeStore

Clock = trio.testing.MockClock  # every test takes pytest-trio's `autojump_clock`: time jumps when all block


def make_worker(
    group: FakeGroup,
    store: FakeStore | None = None,
    analyzer: FakeAnalyzer | None = None,
    consumer: str = "c1",
    **overrides: object,
) -> Worker:
    base = dict(
        consumer=consumer,
        batch_size=10,
        block_ms=100,
        claim_min_idle_ms=1000,
        reclaim_interval_ms=500,
        max_deliveries=3,
        shutdown_grace_s=5.0,
        metrics_port=0,
    )
    base.update(overrides)
    settings = Settings(**base)  # type: ignore[arg-type]
    parts = Parts(group.stream(consumer), store or FakeStore(), analyzer or FakeAnalyzer())
    return build_worker(settings, parts)


def publish(group: FakeGroup, n: int, prefix: str = "p", text: str = "good day") -> list[str]:
    return [group.add({"post_id": f"{prefix}{i}", "content": f"{text} {i}"}) for i in range(n)]


async def test_drain_writes_every_post_once_and_acks_all(autojump_clock: Clock) -> None:
    group, store = FakeGroup(), FakeStore()
    ids = publish(group, 35)
    with trio.fail_after(60):
        await make_worker(group, store).run(drain=True)
    assert len(store.analyses) == 35
    assert sorted(group.acked) == sorted(ids)
    assert group.pel == {}


async def test_ack_only_after_commit_failing_commit_keeps_entry_pending(autojump_clock: Clock) -> None:
    group, store = FakeGroup(), FakeStore()
    [entry_id] = publish(group, 1)
    store.fail_next = 3
    worker = make_worker(group, store)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: worker.run(drain=True))
        # While commits fail, the entry must stay pending and unacked.
        while store.writes < 2:  # noqa: ASYNC110 - polling the fake is the point here
            await trio.sleep(0.01)
        assert entry_id in group.pel
        assert group.acked == []
    assert group.acked == [entry_id]
    assert len(store.analyses) == 1


async def test_commit_cut_after_commit_is_retried_without_second_row(autojump_clock: Clock) -> None:
    group, store = FakeGroup(), FakeStore()
    publish(group, 3)
    store.commit_then_fail = 1
    await make_worker(group, store).run(drain=True)
    assert len(store.analyses) == 3
    assert store.writes == 2  # the retry found the rows there: ON CONFLICT absorbed them
    assert group.pel == {}


async def test_failed_ack_leaves_entry_pending_then_acks(autojump_clock: Clock) -> None:
    group, store = FakeGroup(), FakeStore()
    publish(group, 2)
    worker = make_worker(group, store)
    worker.parts.stream.fail_next["ack"] = 2  # type: ignore[attr-defined]
    await worker.run(drain=True)
    assert len(group.acked) == 2
    assert len(store.analyses) == 2


async def test_poison_text_is_isolated_retried_then_dead_lettered(autojump_clock: Clock) -> None:
    group, store = FakeGroup(), FakeStore()
    publish(group, 4)
    poison = group.add({"post_id": "bad1", "content": "POISON pill"})
    worker = make_worker(group, store, max_deliveries=3)
    with trio.fail_after(600):
        await worker.run(drain=True)
    assert set(store.analyses) == {"p0", "p1", "p2", "p3"}
    [(letter, consumer)] = group.dead
    assert letter.entry.id == poison
    assert letter.entry.deliveries == 3
    assert "analysis failed 3 times" in letter.reason and "poisoned" in letter.reason
    assert consumer == "c1"
    assert worker.totals.retried == 2
    assert group.pel == {}


async def test_invalid_input_goes_to_dead_letter_with_reason(autojump_clock: Clock) -> None:
    group, store = FakeGroup(), FakeStore()
    group.add({"content": "no id"})
    group.add({"data": "[1, 2]"})
    group.add({"post_id": "ok", "content": "fine"})
    await make_worker(group, store).run(drain=True)
    reasons = sorted(letter.reason for letter, _ in group.dead)
    assert reasons == [
        "invalid post: field data must hold a JSON object, got list",
        "invalid post: required field post_id is missing",
    ]
    assert list(store.posts) == ["ok"]
    assert group.pel == {}


async def test_entry_over_max_deliveries_is_analysed_alone_and_written(autojump_clock: Clock) -> None:
    # Delivered five times already, to consumers that died: deliveries are not attempts, so the post is
    # still written, analysed in a batch of its own.
    group, store = FakeGroup(), FakeStore()
    ids = publish(group, 3)
    await group.stream("dead").read(">", 10, None)
    group.pel[ids[1]].count = 5
    analyzer = FakeAnalyzer()
    await make_worker(group, store, analyzer, claim_min_idle_ms=10, max_deliveries=5).run(drain=True)
    assert group.dead == []
    assert set(store.analyses) == {"p0", "p1", "p2"}
    assert analyzer.calls == [["good day 0", "good day 2"], ["good day 1"]]  # p1 alone
    assert group.attempts == {} and group.pel == {}


async def test_entry_that_killed_the_worker_alone_is_dead_lettered_unanalysed(autojump_clock: Clock) -> None:
    # Two earlier analyses of this entry on its own began and never ended: the process died with it.
    group, store = FakeGroup(), FakeStore()
    [entry_id, _] = publish(group, 2)
    await group.stream("dead").read(">", 10, None)
    group.pel[entry_id].count = 9
    group.attempts[f"{entry_id}:solo"] = SOLO_CRASHES
    analyzer = FakeAnalyzer()
    await make_worker(group, store, analyzer, claim_min_idle_ms=10, max_deliveries=5).run(drain=True)
    [(letter, _)] = group.dead
    assert letter.entry.id == entry_id
    assert f"the worker died {SOLO_CRASHES} times while analysing this entry on its own" in letter.reason
    assert analyzer.calls == [["good day 1"]] and set(store.analyses) == {"p1"}
    assert group.attempts == {} and group.pel == {}


async def test_dead_consumers_entries_are_reclaimed_and_processed_once(autojump_clock: Clock) -> None:
    group, store = FakeGroup(), FakeStore()
    ids = publish(group, 12)
    await group.stream("dead").read(">", 100, None)  # read, never acked: the consumer died
    analyzer = FakeAnalyzer()
    worker = make_worker(group, store, analyzer, claim_min_idle_ms=1000)
    await worker.run(drain=True)
    assert sorted(group.acked) == sorted(ids)
    assert len(store.analyses) == 12
    assert sum(len(c) for c in analyzer.calls) == 12  # each analysed exactly once
    assert worker.totals.reclaimed == 12


async def test_pending_entry_deleted_from_stream_is_acked_and_counted(autojump_clock: Clock) -> None:
    group, store = FakeGroup(), FakeStore()
    [gone, _kept] = publish(group, 2)
    await group.stream("dead").read(">", 100, None)
    del group.entries[gone]  # XDEL
    worker = make_worker(group, store, claim_min_idle_ms=10)
    await worker.run(drain=True)
    assert worker.totals.deleted == 1
    assert gone not in group.pel and group.pel == {}
    assert list(store.posts) == ["p1"]


async def test_restart_reads_own_pending_entries_first(autojump_clock: Clock) -> None:
    group, store = FakeGroup(), FakeStore()
    ids = publish(group, 5)
    await group.stream("c1").read(">", 3, None)  # same consumer name, crashed before acking
    analyzer = FakeAnalyzer()
    await make_worker(group, store, analyzer, claim_min_idle_ms=10**9).run(drain=True)
    assert analyzer.calls[0] == ["good day 0", "good day 1", "good day 2"]
    assert sorted(group.acked) == sorted(ids)


async def test_stop_during_batch_acks_only_what_was_written(autojump_clock: Clock) -> None:
    group, store = FakeGroup(), FakeStore()
    publish(group, 30)
    analyzer = FakeAnalyzer(delay=2.0)
    worker = make_worker(group, store, analyzer, shutdown_grace_s=3.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.run)
        await trio.sleep(1.0)  # first batch is inside the model
        worker.stop()
    written = {r.post.entry_id for r in store.analyses.values()}
    assert set(group.acked) == written  # nothing acked that is not in the store
    assert 0 < len(written) < 30
    assert all(i not in group.pel for i in written)
    unread_or_pending = set(group.entries) - written
    assert unread_or_pending  # left for the next worker: pending or never read


async def test_stop_after_grace_cancels_slow_batch_leaving_it_pending(autojump_clock: Clock) -> None:
    group, store = FakeGroup(), FakeStore()
    ids = publish(group, 5)
    worker = make_worker(group, store, FakeAnalyzer(delay=100.0), shutdown_grace_s=2.0)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.run)
            await trio.sleep(1.0)
            worker.stop()
    assert group.acked == [] and store.analyses == {}
    assert sorted(group.pel) == sorted(ids)  # still pending, for reclaim


async def test_lease_renewal_keeps_slow_batch_from_being_reclaimed(autojump_clock: Clock) -> None:
    group, store = FakeGroup(), FakeStore()
    publish(group, 10)
    slow, other = FakeAnalyzer(delay=5.0), FakeAnalyzer()
    w1 = make_worker(group, store, slow, consumer="slow", claim_min_idle_ms=1000, reclaim_interval_ms=100)
    w2 = make_worker(group, store, other, consumer="other", claim_min_idle_ms=1000, reclaim_interval_ms=100)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: w1.run(drain=True))
            await trio.sleep(0.5)  # w1 holds the batch in its slow model
            nursery.start_soon(lambda: w2.run(drain=True))
    assert other.calls == []  # never stole the batch, though it sat in the model 5× CLAIM_MIN_IDLE_MS
    assert len(store.analyses) == 10 and group.pel == {}


async def test_redis_outage_is_logged_once_and_worker_resumes(
    autojump_clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    group, store = FakeGroup(), FakeStore()
    publish(group, 3)
    worker = make_worker(group, store)
    worker.parts.stream.fail_next["*"] = 20  # type: ignore[attr-defined]
    await worker.run(drain=True)
    assert len(store.analyses) == 3
    outage_lines = [r for r in caplog.records if "Redis unavailable" in r.getMessage()]
    assert len(outage_lines) == 1
    assert any("Redis is back" in r.getMessage() for r in caplog.records)


async def test_duplicate_redelivery_counts_as_duplicate_not_new_row(autojump_clock: Clock) -> None:
    group, store = FakeGroup(), FakeStore()
    group.add({"post_id": "same", "content": "x"})
    group.add({"post_id": "same", "content": "x"})
    worker = make_worker(group, store)
    await worker.run(drain=True)
    assert len(store.analyses) == 1
    assert worker.totals.written == 2 and worker.totals.duplicates == 1


class UnloadableAnalyzer(FakeAnalyzer):
    def __init__(self) -> None:
        super().__init__()
        self.loaded = False

    async def analyze(self, texts: list[str]) -> list:  # type: ignore[override]
        raise ModelError("default_model.safetensors is missing")


async def test_model_that_cannot_load_stops_the_worker_and_blames_no_post(autojump_clock: Clock) -> None:
    group, store = FakeGroup(), FakeStore()
    ids = publish(group, 5)
    with pytest.raises(BaseExceptionGroup) as raised:
        await make_worker(group, store, UnloadableAnalyzer()).run(drain=True)
    assert raised.group_contains(ModelError, match="could not be loaded")
    assert group.dead == [] and group.acked == []
    assert sorted(group.pel) == sorted(ids)  # all still pending, for a worker with a model


async def test_stop_during_startup_while_redis_is_down_returns(autojump_clock: Clock) -> None:
    group = FakeGroup()
    worker = make_worker(group)
    worker.parts.stream.fail_next["*"] = 10**6  # type: ignore[attr-defined]
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker.run)
            await trio.sleep(5)
            worker.stop()


async def test_summary_line_every_30s_has_rate_backlog_and_errors(
    autojump_clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    group, store = FakeGroup(), FakeStore()
    publish(group, 20)
    caplog.set_level("INFO", logger="sentiment.worker")
    worker = make_worker(group, store)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(worker.run)
        await trio.sleep(31)
        worker.stop()
    [line] = [r.getMessage() for r in caplog.records if "posts/s" in r.getMessage()]
    assert "backlog 0" in line and "written 20" in line and "analysis errors 0" in line


class RecoveringAnalyzer(FakeAnalyzer):
    """Fails its first `failures` calls whatever the texts (a provider coming back half-way through)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def analyze(self, texts: list[str]) -> list:  # type: ignore[override]
        self.calls.append(list(texts))
        if self.failures:
            self.failures -= 1
            raise ModelError("provider hiccup")
        return await super().analyze(texts)


async def test_a_model_that_recovers_half_way_through_a_batch_blames_no_text(autojump_clock: Clock) -> None:
    # The batch fails, then its first two texts alone, then the model is back: with MAX_DELIVERIES=1 a
    # blamed text would be dead-lettered at once.
    group, store = FakeGroup(), FakeStore()
    publish(group, 4)
    analyzer = RecoveringAnalyzer(failures=3)
    await make_worker(group, store, analyzer, max_deliveries=1).run(drain=True)
    assert group.dead == [] and set(store.analyses) == {"p0", "p1", "p2", "p3"}
    assert group.attempts == {}


async def test_a_model_failing_every_text_and_the_probe_waits_and_blames_none(autojump_clock: Clock) -> None:
    group, store = FakeGroup(), FakeStore()
    publish(group, 3)
    analyzer = RecoveringAnalyzer(failures=40)  # a long outage that says "error", not "unavailable"
    worker = make_worker(group, store, analyzer, max_deliveries=1)
    with trio.fail_after(3600):
        await worker.run(drain=True)
    assert group.dead == [] and set(store.analyses) == {"p0", "p1", "p2"}
    assert analyzer.failures == 0  # it waited the whole outage out


def recorded_reads(worker: Worker) -> list[tuple[int, list[Entry]]]:
    """Each XREADGROUP of the worker from now on: the count asked and the entries it got."""
    stream, reads = worker.parts.stream, []
    read = stream.read

    async def recording(start: str, count: int, block_ms: int | None) -> tuple[list[Entry], list[str]]:
        entries, deleted = await read(start, count, block_ms)
        reads.append((count, entries))
        return entries, deleted

    stream.read = recording  # type: ignore[method-assign]
    return reads


async def test_reads_shrink_to_the_batch_byte_budget_when_entries_are_large(autojump_clock: Clock) -> None:
    # 40 valid posts of about 900 KB each (a padding field; within MAX_ENTRY_BYTES). The first read takes
    # BATCH_SIZE of them and hands them on in batches of at most BATCH_BYTES (8 of them); every later read
    # takes only what fits (8).
    group, store = FakeGroup(), FakeStore()
    pad = "x" * 900_000
    for i in range(40):
        group.add({"post_id": f"p{i}", "content": f"good day {i}", "padding": pad})
    worker = make_worker(group, store, batch_size=20)
    reads = recorded_reads(worker)
    sizes: list[int] = []
    worker.on_commit.append(lambda outcome, analysed, batch: sizes.append(len(batch.entries)))
    with trio.fail_after(60):
        await worker.run(drain=True)
    assert sizes == [8, 8, 4, 8, 8, 4]
    counts = [count for count, _ in reads]
    assert counts[:4] == [20, 20, 8, 8]  # the own-pending re-read (empty), then new entries
    assert len(store.analyses) == 40 and group.pel == {}


async def test_a_few_small_entries_between_large_ones_do_not_reopen_a_full_read(
    autojump_clock: Clock,
) -> None:
    # After large entries the read size grows back at most twofold per read: 30 small posts ahead of 40
    # large ones let the reads take 8 → 16 → 32 entries, not BATCH_SIZE large ones at once.
    group, store = FakeGroup(), FakeStore()
    pad = "x" * 900_000

    def large(prefix: str, n: int) -> None:
        for i in range(n):
            group.add({"post_id": f"{prefix}{i}", "content": "good day", "padding": pad})

    large("a", 10)
    worker = make_worker(group, store, batch_size=200)
    reads = recorded_reads(worker)
    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            while len(store.analyses) < 10:  # noqa: ASYNC110 - the fake store has no event
                await trio.sleep(0.1)
            reads.clear()
            for i in range(30):
                group.add({"post_id": f"s{i}", "content": "good day"})
            large("b", 40)
            while len(store.analyses) < 80:  # noqa: ASYNC110
                await trio.sleep(0.1)
            worker.stop()
    got = [sum(b"padding" in e.fields for e in entries) for _, entries in reads]  # large entries per read
    assert max(got) <= 32 and sum(got) == 40 and group.pel == {}


async def test_a_dead_consumers_large_entries_are_claimed_within_the_byte_budget(
    autojump_clock: Clock,
) -> None:
    group, store = FakeGroup(), FakeStore()
    for i in range(30):
        group.add({"post_id": f"p{i}", "content": "good day", "padding": "x" * 900_000})
    await group.stream("dead").read(">", 100, None)  # read, never acked: the consumer died
    worker = make_worker(group, store, claim_min_idle_ms=1000, batch_size=20)
    autoclaim, counts = worker.parts.stream.autoclaim, []

    async def counted(cursor: str, min_idle_ms: int, count: int) -> Claimed:
        claimed = await autoclaim(cursor, min_idle_ms, count)
        if claimed.entries:  # before CLAIM_MIN_IDLE_MS nothing is claimed
            counts.append(count)
        return claimed

    worker.parts.stream.autoclaim = counted  # type: ignore[method-assign]
    sizes: list[int] = []
    worker.on_commit.append(lambda outcome, analysed, batch: sizes.append(len(batch.entries)))
    await worker.run(drain=True)
    assert len(store.analyses) == 30 and group.pel == {}
    assert counts[:3] == [20, 8, 8] and max(sizes) == 8  # the first claim, then what fits in 8 MB


def test_an_entry_of_many_tiny_fields_counts_what_python_holds_for_them() -> None:
    # 100,000 empty fields: 600 KB of names, but some 10 MB in Python.
    many = Entry("1-0", {b"f%d" % i: b"" for i in range(100_000)})
    assert entry_size(many) >= 10_000_000
    assert read_count([entry_size(many)], 256, 256) == 1
    assert read_count([1_000], 256, 4) == 8  # grows back twofold per read
    assert read_count([], 256, 4) == 8
