"""The queue's contract, on both implementations; Redis-only delivery rules against a real redis-server."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from server_harness import RedisServer, wait_until

from server.queue import (
    CANCELED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    IdempotencyConflict,
    Job,
    MemoryJobQueue,
    QueueFull,
    QueueUnavailable,
    RedisJobQueue,
    fingerprint,
)
from snapgen.request import GenerationRequest


def new_job(prompt="a red circle", n=1, owner="anonymous") -> Job:
    request = GenerationRequest(prompt, n=n, width=128, height=128, steps=2, guidance_scale=1.0, seed=1)
    return Job(id=uuid.uuid4().hex, request=request, owner=owner)


_LOOP = asyncio.new_event_loop()  # one loop: a queue's async Redis client stays bound to the loop it met first


def run(coro):
    return _LOOP.run_until_complete(coro)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("qlogs"), tmp_path_factory.mktemp("qdata")).start()
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
def queue(request, redis_server):
    if request.param == "memory":
        q = MemoryJobQueue()
    else:
        q = RedisJobQueue(redis_server.url, prefix=f"t{uuid.uuid4().hex[:8]}", claim_idle_s=60)
    yield q
    q.close()


def test_submit_reserve_start_complete_and_results_are_written_once(queue):
    job, created = run(queue.submit(new_job(n=2), max_depth=10))
    assert created and job.status == QUEUED and job.queue_position == 0
    [reserved] = queue.reserve("w1", max_jobs=4, block_s=1.0)
    assert reserved.id == job.id and reserved.n == 2
    [running] = queue.start("w1", [reserved])
    assert running.status == RUNNING
    assert queue.progress([running], 1, 2) == set()
    assert run(queue.get(job.id)).step == 1
    assert queue.complete(running, [b"image-0", b"image-1"], {"seeds": [1, 2], "count": 2})
    # A re-delivered copy finishing later must not replace the result (at-least-once delivery).
    assert not queue.complete(running, [b"other-0", b"other-1"], {"seeds": [9, 9], "count": 2})
    assert not queue.fail(running, {"code": "x", "message": "late failure"})
    done = run(queue.get(job.id))
    assert done.status == SUCCEEDED and done.result["seeds"] == [1, 2] and done.step == 2
    assert run(queue.images(job.id, 2)) == [b"image-0", b"image-1"]
    assert queue.reserve("w1", max_jobs=4, block_s=0) == []


def test_input_images_travel_beside_the_job_and_previews_last_while_it_runs(queue):
    job = new_job()
    job.input_image, job.preview = b"\x89PNG input bytes", True
    submitted, _ = run(queue.submit(job, max_depth=10))
    assert submitted.input_image is None and run(queue.get(job.id)).input_image is None  # not the job's state
    [reserved] = queue.reserve("w1", max_jobs=4, block_s=1.0)
    assert reserved.input_image == b"\x89PNG input bytes" and reserved.preview
    [running] = queue.start("w1", [reserved])
    assert run(queue.preview(job.id)) is None
    queue.progress([running], 1, 2, {job.id: b"jpeg step 1"})
    assert run(queue.preview(job.id)) == b"jpeg step 1"
    queue.progress([running], 2, 2)  # a step without a new picture keeps the last one
    assert run(queue.preview(job.id)) == b"jpeg step 1"
    assert queue.complete(running, [b"image-0"], {"seeds": [1], "count": 1})
    assert run(queue.preview(job.id)) is None  # a final job needs neither its picture nor its input
    if queue.kind == "redis":
        assert not queue.sync.exists(queue.input_key(job.id), queue.preview_key(job.id))


def test_queue_positions_cancel_and_backpressure(queue):
    jobs = [run(queue.submit(new_job(f"p{i}"), max_depth=3))[0] for i in range(3)]
    assert [j.queue_position for j in jobs] == [0, 1, 2]
    with pytest.raises(QueueFull) as full:
        run(queue.submit(new_job("one too many"), max_depth=3))
    assert full.value.queued == 3
    canceled = run(queue.cancel(jobs[1].id))
    assert canceled.status == CANCELED
    assert run(queue.get(jobs[2].id)).queue_position == 1
    assert run(queue.stats()).queued == 2
    reserved = queue.reserve("w1", max_jobs=10, block_s=0.5)
    assert [j.id for j in reserved] == [jobs[0].id, jobs[2].id]  # the canceled job never reaches a worker
    # Cancelling a running job: the worker learns it at its next progress report.
    running = queue.start("w1", reserved)
    run(queue.cancel(jobs[0].id))
    assert queue.progress(running, 1, 2) == {jobs[0].id}
    assert queue.mark_canceled(running[0])
    assert not queue.complete(running[0], [b"x"], {"count": 1})
    assert run(queue.get(jobs[0].id)).status == CANCELED
    assert run(queue.cancel(uuid.uuid4().hex)) is None


def test_idempotency_keys(queue):
    body = {"prompt": "a red circle", "n": 1}
    first, created = run(queue.submit(new_job(), 10, ("key-1", fingerprint(body))))
    again, created_again = run(queue.submit(new_job(), 10, ("key-1", fingerprint(body))))
    assert created and not created_again and again.id == first.id
    with pytest.raises(IdempotencyConflict) as conflict:
        run(queue.submit(new_job(), 10, ("key-1", fingerprint({**body, "n": 2}))))
    assert conflict.value.job_id == first.id
    other_owner, created = run(queue.submit(new_job(owner="someone-else"), 10, ("key-1", fingerprint(body))))
    assert created and other_owner.id != first.id  # keys are scoped to their owner


def test_hand_back_requeues_for_another_worker(queue):
    job, _ = run(queue.submit(new_job(), 10))
    running = queue.start("w1", queue.reserve("w1", 1, 1.0))
    queue.release(running)
    back = run(queue.get(job.id))
    assert back.status == QUEUED and back.worker is None
    [again] = queue.reserve("w2", 1, 1.0)
    assert again.id == job.id
    [rerun] = queue.start("w2", [again])
    assert rerun.attempts == 2


def test_watch_wakes_waiters_from_worker_threads(queue):
    job, _ = run(queue.submit(new_job(), 10))

    async def scenario():
        async with queue.watch(job.id) as watch:
            loop = asyncio.get_running_loop()
            waiter = loop.create_task(watch.wait(30))
            await asyncio.sleep(0)
            started = time.monotonic()
            await loop.run_in_executor(None, lambda: queue.start("w1", queue.reserve("w1", 1, 1.0)))
            assert await waiter
            return time.monotonic() - started

    assert run(scenario()) < 5


def test_rate_counter(queue):
    counts = [run(queue.hit("client-a", 60))[0] for _ in range(3)]
    assert counts == [1, 2, 3]
    assert run(queue.hit("client-b", 60))[0] == 1


# -- Redis only ---------------------------------------------------------------------------------
def test_dead_letter_after_max_deliveries(redis_server):
    prefix = f"dl{uuid.uuid4().hex[:6]}"
    job, _ = run(RedisJobQueue(redis_server.url, prefix=prefix).submit(new_job(), 10))
    workers = [RedisJobQueue(redis_server.url, prefix=prefix, claim_idle_s=0.05, max_deliveries=2) for _ in range(3)]
    first = workers[0].reserve("a", 1, 1.0)  # delivery 1; worker "a" then dies silently
    assert [j.deliveries for j in first] == [1]
    workers[0].start("a", first)

    def reclaimed(queue, consumer):
        def attempt():
            queue._next_reclaim = 0.0
            return queue.reserve(consumer, 1, 0.05)

        return wait_until(attempt, 10, f"{consumer} to reclaim the job")

    second = reclaimed(workers[1], "b")  # delivery 2 <= K: runs again
    assert second[0].id == job.id and second[0].deliveries == 2
    workers[1].start("b", second)

    def dead_lettered():
        workers[2]._next_reclaim = 0.0
        assert workers[2].reserve("c", 1, 0.05) == []
        return workers[2].take_dead_lettered()

    assert wait_until(dead_lettered, 10, "the job to be dead-lettered") == 1
    failed = run(workers[2].get(job.id))
    assert failed.status == FAILED and failed.error["code"] == "dead_lettered"
    client = redis_server.client()
    dead = client.xrange(f"{prefix}:dead")
    assert len(dead) == 1 and dead[0][1][b"id"].decode() == job.id
    assert client.xlen(f"{prefix}:jobs") == 0 and client.xpending(f"{prefix}:jobs", "workers")["pending"] == 0
    # The slow first worker finishing now changes nothing.
    assert not workers[0].complete(first[0], [b"late"], {"count": 1})
    assert run(workers[0].get(job.id)).status == FAILED


def test_heartbeat_keeps_a_long_job_from_being_reclaimed(redis_server):
    prefix = f"hb{uuid.uuid4().hex[:6]}"
    owner = RedisJobQueue(redis_server.url, prefix=prefix, claim_idle_s=0.3)
    thief = RedisJobQueue(redis_server.url, prefix=prefix, claim_idle_s=0.3)
    run(owner.submit(new_job(), 10))
    held = owner.start("a", owner.reserve("a", 1, 1.0))
    until = time.monotonic() + 1.0
    while time.monotonic() < until:  # a healthy worker, busy for 3x the claim idle time
        owner.heartbeat("a", {"heartbeat_s": 0.1}, held=held)
        thief._next_reclaim = 0.0
        assert thief.reserve("b", 1, 0.1) == []
    # Silent from now on: the job is reclaimed.
    thief_got = wait_until(lambda: (setattr(thief, "_next_reclaim", 0.0), thief.reserve("b", 1, 0.1))[1], 10,
                           "the job to be reclaimed")  # fmt: skip
    assert thief_got[0].deliveries == 2


def test_redis_down_is_queue_unavailable(tmp_path):
    port_server = RedisServer(tmp_path / "logs", tmp_path / "data")
    port_server.log_path.parent.mkdir(parents=True, exist_ok=True)
    queue = RedisJobQueue(port_server.url)  # nothing listens there yet
    with pytest.raises(QueueUnavailable):
        run(queue.ping())
    with pytest.raises(QueueUnavailable):
        queue.reserve("w", 1, 0)
