"""Tests of the in-process state store: idempotency claims and token buckets, on a fake clock."""

from __future__ import annotations

import pytest

from gateway.state import Claim, ClaimStatus, StoredReply
from gateway.state.memory import MemoryStore

TTL_S = 3600.0
KEY = "idem:drx:abc"
FP = "fingerprint-1"
OTHER_FP = "fingerprint-2"
REPLY = StoredReply(200, b'{"id": "r-1"}', "application/json")


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(clock: FakeClock) -> MemoryStore:
    return MemoryStore(max_entries=1000, clock=clock)


# claims


async def test_first_claim_is_new(store: MemoryStore) -> None:
    assert await store.claim(KEY, FP, TTL_S) == Claim(ClaimStatus.NEW)


async def test_second_claim_same_fingerprint_is_in_progress(store: MemoryStore) -> None:
    await store.claim(KEY, FP, TTL_S)
    assert await store.claim(KEY, FP, TTL_S) == Claim(ClaimStatus.IN_PROGRESS)


async def test_second_claim_other_fingerprint_is_conflict(store: MemoryStore) -> None:
    await store.claim(KEY, FP, TTL_S)
    assert await store.claim(KEY, OTHER_FP, TTL_S) == Claim(ClaimStatus.CONFLICT)


async def test_claims_of_other_keys_are_independent(store: MemoryStore) -> None:
    await store.claim(KEY, FP, TTL_S)
    assert (await store.claim("idem:drx:other", FP, TTL_S)).status is ClaimStatus.NEW
    assert (await store.claim("idem:telemed-one:abc", OTHER_FP, TTL_S)).status is ClaimStatus.NEW


async def test_complete_then_claim_replays_the_reply(store: MemoryStore) -> None:
    await store.claim(KEY, FP, TTL_S)
    await store.complete(KEY, FP, REPLY, TTL_S)
    claim = await store.claim(KEY, FP, TTL_S)
    assert claim.status is ClaimStatus.REPLAY
    assert claim.reply == REPLY
    # and again: replays are not consumed
    assert (await store.claim(KEY, FP, TTL_S)).reply == REPLY


async def test_complete_then_claim_other_fingerprint_is_conflict(store: MemoryStore) -> None:
    await store.claim(KEY, FP, TTL_S)
    await store.complete(KEY, FP, REPLY, TTL_S)
    assert await store.claim(KEY, OTHER_FP, TTL_S) == Claim(ClaimStatus.CONFLICT)


async def test_release_forgets_the_claim(store: MemoryStore) -> None:
    await store.claim(KEY, FP, TTL_S)
    await store.release(KEY, FP)
    assert (await store.claim(KEY, FP, TTL_S)).status is ClaimStatus.NEW


async def test_release_lets_another_body_take_the_reference(store: MemoryStore) -> None:
    await store.claim(KEY, FP, TTL_S)
    await store.release(KEY, FP)
    assert (await store.claim(KEY, OTHER_FP, TTL_S)).status is ClaimStatus.NEW


async def test_release_with_another_fingerprint_does_nothing(store: MemoryStore) -> None:
    await store.claim(KEY, FP, TTL_S)
    await store.release(KEY, OTHER_FP)
    assert (await store.claim(KEY, FP, TTL_S)).status is ClaimStatus.IN_PROGRESS


async def test_release_after_complete_does_nothing(store: MemoryStore) -> None:
    await store.claim(KEY, FP, TTL_S)
    await store.complete(KEY, FP, REPLY, TTL_S)
    await store.release(KEY, FP)
    claim = await store.claim(KEY, FP, TTL_S)
    assert (claim.status, claim.reply) == (ClaimStatus.REPLAY, REPLY)


async def test_release_of_an_unknown_key_does_nothing(store: MemoryStore) -> None:
    await store.release("idem:drx:never", FP)
    assert (await store.claim("idem:drx:never", FP, TTL_S)).status is ClaimStatus.NEW


async def test_in_progress_claim_expires_after_ttl(store: MemoryStore, clock: FakeClock) -> None:
    await store.claim(KEY, FP, 60)
    clock.advance(59)
    assert (await store.claim(KEY, OTHER_FP, 60)).status is ClaimStatus.CONFLICT
    clock.advance(1.5)
    assert (await store.claim(KEY, OTHER_FP, 60)).status is ClaimStatus.NEW


async def test_completed_record_expires_after_ttl(store: MemoryStore, clock: FakeClock) -> None:
    await store.claim(KEY, FP, TTL_S)
    clock.advance(10)
    await store.complete(KEY, FP, REPLY, TTL_S)  # the ttl runs from completion
    clock.advance(TTL_S - 1)
    assert (await store.claim(KEY, FP, TTL_S)).status is ClaimStatus.REPLAY
    clock.advance(2)
    assert (await store.claim(KEY, FP, TTL_S)) == Claim(ClaimStatus.NEW)


async def test_record_ttl_shorter_than_store_ttl_is_honoured(
    store: MemoryStore, clock: FakeClock
) -> None:
    await store.claim(KEY, FP, 10)
    await store.complete(KEY, FP, REPLY, 10)
    clock.advance(11)
    assert (await store.claim(KEY, FP, 10)).status is ClaimStatus.NEW


async def test_close_forgets_everything(store: MemoryStore) -> None:
    await store.claim(KEY, FP, TTL_S)
    await store.complete(KEY, FP, REPLY, TTL_S)
    for _ in range(5):
        await store.take("rate:drx", 5)
    await store.close()
    assert (await store.claim(KEY, FP, TTL_S)).status is ClaimStatus.NEW
    assert await store.take("rate:drx", 5) == 0.0


# token buckets


async def test_bucket_allows_a_full_minute_at_once_then_asks_to_wait(store: MemoryStore) -> None:
    waits = [await store.take("rate:drx", 60) for _ in range(60)]
    assert waits == [0.0] * 60
    assert await store.take("rate:drx", 60) == pytest.approx(1.0)


async def test_bucket_refills_over_time(store: MemoryStore, clock: FakeClock) -> None:
    for _ in range(60):
        await store.take("rate:drx", 60)
    assert await store.take("rate:drx", 60) > 0
    clock.advance(1.0)
    assert await store.take("rate:drx", 60) == 0.0
    assert await store.take("rate:drx", 60) == pytest.approx(1.0)


async def test_bucket_wait_shrinks_as_time_passes(store: MemoryStore, clock: FakeClock) -> None:
    for _ in range(60):
        await store.take("rate:drx", 60)
    clock.advance(0.25)
    assert await store.take("rate:drx", 60) == pytest.approx(0.75)


async def test_bucket_refill_is_capped_at_one_minute(store: MemoryStore, clock: FakeClock) -> None:
    for _ in range(10):
        await store.take("rate:drx", 10)
    clock.advance(3600)  # an hour idle refills to the burst, not beyond
    assert [await store.take("rate:drx", 10) for _ in range(10)] == [0.0] * 10
    assert await store.take("rate:drx", 10) == pytest.approx(6.0)


async def test_slow_rate_wait(store: MemoryStore) -> None:
    assert [await store.take("rate:slow", 2) for _ in range(2)] == [0.0, 0.0]
    assert await store.take("rate:slow", 2) == pytest.approx(30.0)


async def test_buckets_are_independent(store: MemoryStore) -> None:
    for _ in range(60):
        await store.take("rate:drx", 60)
    assert await store.take("rate:drx", 60) > 0
    assert await store.take("rate:telemed-one", 60) == 0.0


async def test_refused_take_does_not_consume(store: MemoryStore, clock: FakeClock) -> None:
    for _ in range(60):
        await store.take("rate:drx", 60)
    for _ in range(5):
        assert await store.take("rate:drx", 60) > 0
    clock.advance(1.0)
    assert await store.take("rate:drx", 60) == 0.0


# bounds


async def test_records_beyond_max_entries_are_dropped_oldest_first(clock: FakeClock) -> None:
    store = MemoryStore(max_entries=3, clock=clock)
    reply = StoredReply(200, b"{}", "application/json")
    for n in range(4):
        await store.claim(f"k{n}", FP, TTL_S)
        await store.complete(f"k{n}", FP, reply, TTL_S)

    assert (await store.claim("k0", FP, TTL_S)).status is ClaimStatus.NEW  # the oldest went
    assert (await store.claim("k3", FP, TTL_S)).status is ClaimStatus.REPLAY


async def test_expired_records_leave_memory_when_newer_ones_arrive(
    store: MemoryStore, clock: FakeClock
) -> None:
    reply = StoredReply(200, b"{}", "application/json")
    for n in range(10):
        await store.claim(f"old{n}", FP, TTL_S)
        await store.complete(f"old{n}", FP, reply, TTL_S)
    clock.advance(TTL_S + 1)

    await store.claim("new", FP, TTL_S)

    assert len(store) == 1  # only "new": the expired ones were dropped on the way
