"""The queue's limits against a real redis-server: finished jobs are retained by count and bytes as well
as time (both queues), and a Redis at or near its maxmemory is an unavailable queue, not a crash."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest
from server_harness import RedisServer, fill_redis, metric_values

from server.queue import CANCELED, QUEUED, SUCCEEDED, Job, MemoryJobQueue, QueueStoreFull, RedisJobQueue
from server.worker import Worker
from snapgen.request import GenerationRequest

ASYNC = {"Prefer": "respond-async"}
_LOOP = asyncio.new_event_loop()  # one loop: a queue's async Redis client stays bound to the loop it met first


def run(coro):
    return _LOOP.run_until_complete(coro)


def new_job(prompt="a red circle") -> Job:
    request = GenerationRequest(prompt, n=1, width=128, height=128, steps=2, guidance_scale=1.0, seed=1)
    return Job(id=uuid.uuid4().hex, request=request)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("llogs"), tmp_path_factory.mktemp("ldata")).start()
    yield server
    server.stop()


@pytest.fixture(params=["memory", "redis"])
def make_queue(request, redis_server):
    made = []

    def make(**limits):
        if request.param == "memory":
            q = MemoryJobQueue(**limits)
        else:
            q = RedisJobQueue(redis_server.url, prefix=f"l{uuid.uuid4().hex[:8]}", claim_idle_s=60, **limits)
        made.append(q)
        return q

    yield make
    for q in made:
        q.close()


def finish_one(queue, image: bytes) -> Job:
    job, _ = run(queue.submit(new_job(), max_depth=100))
    [running] = queue.start("w", queue.reserve("w", 1, 1.0))
    assert queue.complete(running, [image], {"count": 1})
    return job


# -- retention -----------------------------------------------------------------------------------
def test_finished_jobs_are_capped_by_count_oldest_first(make_queue):
    queue = make_queue(result_max_jobs=5)
    jobs = [run(queue.submit(new_job(f"p{i}"), max_depth=100))[0] for i in range(30)]
    for job in jobs:  # submit-and-cancel: each one a finished job with no result
        assert run(queue.cancel(job.id)).status == CANCELED
    assert [run(queue.get(j.id)) for j in jobs[:25]] == [None] * 25  # evicted: gone as an expired job is
    assert all(run(queue.get(j.id)).status == CANCELED for j in jobs[25:])
    stats = run(queue.stats())
    assert (stats.retained_jobs, stats.evicted) == (5, 25) and stats.retained_bytes > 0
    # Jobs still waiting or running are never evicted.
    waiting, _ = run(queue.submit(new_job("waiting"), max_depth=100))
    for _ in range(3):
        run(queue.cancel(run(queue.submit(new_job(), max_depth=100))[0].id))
    assert run(queue.get(waiting.id)).status == QUEUED


def test_finished_jobs_are_capped_by_bytes_oldest_first(make_queue):
    queue = make_queue(result_max_bytes=20_000)
    jobs = [finish_one(queue, bytes([i]) * 4000) for i in range(10)]
    stats = run(queue.stats())
    assert stats.retained_bytes <= 20_000 and stats.retained_jobs == 4 and stats.evicted == 6
    assert [run(queue.get(j.id)) for j in jobs[:6]] == [None] * 6
    assert run(queue.images(jobs[0].id, 1)) == [None]  # the images went with the job
    assert run(queue.get(jobs[-1].id)).status == SUCCEEDED
    assert run(queue.images(jobs[-1].id, 1)) == [bytes([9]) * 4000]
    # A result larger than the cap on its own still stays until the next one comes.
    huge = finish_one(queue, b"x" * 50_000)
    assert run(queue.images(huge.id, 1)) == [b"x" * 50_000] and run(queue.stats()).retained_jobs == 1
    after = finish_one(queue, b"y" * 100)
    assert run(queue.get(huge.id)) is None and run(queue.get(after.id)).status == SUCCEEDED


def test_many_submit_and_cancel_jobs_stay_bounded_in_memory():
    queue = MemoryJobQueue(result_max_jobs=1000)
    for i in range(5000):
        job, _ = run(queue.submit(new_job(), 10, (f"key-{i}", "fingerprint")))
        run(queue.cancel(job.id))
    queue._sweep(time.time() + 11)
    assert len(queue._jobs) == 1000 and len(queue._idem) == 1000 and run(queue.stats()).evicted == 4000


def test_redis_index_forgets_jobs_past_their_ttl(redis_server):
    queue = RedisJobQueue(redis_server.url, prefix=f"ttl{uuid.uuid4().hex[:6]}", result_ttl_s=1)
    first = finish_one(queue, b"a" * 1000)
    time.sleep(2.1)
    assert run(queue.get(first.id)) is None  # Redis expired it
    second = finish_one(queue, b"b" * 1000)
    stats = run(queue.stats())
    assert (stats.retained_jobs, stats.evicted) == (1, 0) and 1000 < stats.retained_bytes < 3000
    assert run(queue.get(second.id)).status == SUCCEEDED


def test_evicted_jobs_are_404_and_counted_in_metrics():
    from server.api import create_app
    from server.settings import Settings

    app = create_app(Settings(), queue=MemoryJobQueue(result_max_jobs=2), start_worker=False)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            ids = []
            for i in range(4):
                response = await client.post("/v1/generate", json={"prompt": f"p{i}"}, headers=ASYNC)
                assert response.status_code == 202, response.text
                ids.append(response.json()["id"])
                assert (await client.delete(f"/v1/jobs/{ids[-1]}")).status_code == 200
            codes = [(await client.get(f"/v1/jobs/{job_id}")).status_code for job_id in ids]
            return codes, metric_values((await client.get("/metrics")).text)

    codes, values = asyncio.run(scenario())
    assert codes == [404, 404, 200, 200]
    assert values["snapgen_results_evicted_total"] == 2 and values["snapgen_results_retained"] == 2


# -- a full Redis --------------------------------------------------------------------------------
@pytest.fixture
def small_redis(tmp_path):
    server = RedisServer(tmp_path / "logs", tmp_path / "data")
    server.log_path.parent.mkdir(parents=True, exist_ok=True)
    server.start()
    yield server, server.client()
    server.stop()


async def scrape(queue) -> dict[str, float]:
    """The API's /metrics on ``queue``."""
    from server.api import create_app
    from server.settings import Settings

    app = create_app(Settings(), queue=queue, start_worker=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        return metric_values((await client.get("/metrics")).text)


def test_redis_above_the_high_water_mark_refuses_new_jobs_but_keeps_working(small_redis):
    server, client = small_redis
    queue = RedisJobQueue(server.url, prefix="hw", high_water=0.9)
    held, _ = run(queue.submit(new_job(), 10))
    for i in range(1000):  # some data (small values: no large buffers), so that 5 % of it is room enough
        client.set(f"data:{i}", b"d" * 10_000)
    used = int(client.info("memory")["used_memory"])
    client.config_set("maxmemory", str(int(used / 0.95)))  # 95 % used: not full, above the mark
    time.sleep(RedisJobQueue.MEMORY_CHECK_S)  # submit looks again after this long
    with pytest.raises(QueueStoreFull, match="Redis is full"):
        run(queue.submit(new_job(), 10))
    with pytest.raises(QueueStoreFull):
        run(queue.ping())
    assert run(scrape(queue))["snapgen_queue_store_full"] == 1  # what SnapgenRedisFull alerts on
    assert client.set("still-writable", b"1")  # refused before Redis itself refuses anything
    [running] = queue.start("w", queue.reserve("w", 1, 1.0))  # accepted jobs still run and finish
    assert queue.complete(running, [b"img"], {"count": 1})
    client.config_set("maxmemory", "0")  # no maxmemory: no check
    run(queue.ping())
    assert run(scrape(queue))["snapgen_queue_store_full"] == 0
    assert run(queue.submit(new_job(), 10))[1]
    assert run(queue.get(held.id)).status == SUCCEEDED


def test_redis_at_maxmemory_is_queue_store_full_and_a_worker_hands_back(small_redis):
    server, client = small_redis
    queue = RedisJobQueue(server.url, prefix="oom", claim_idle_s=60)
    job, _ = run(queue.submit(new_job(), 10))
    [running] = queue.start("w", queue.reserve("w", 1, 1.0))
    fill_redis(client)
    with pytest.raises(QueueStoreFull, match="Redis is full"):
        queue.complete(running, [b"img" * 1000], {"count": 1})
    with pytest.raises(QueueStoreFull):
        run(queue.cancel(job.id))
    with pytest.raises(QueueStoreFull):
        run(queue.ping())
    with pytest.raises(QueueStoreFull):
        queue.heartbeat("w", {"heartbeat_s": 1}, held=[running])
    assert client.hget("oom:job:" + job.id, "status") == b"running"  # the refused writes left nothing half done

    # The worker keeps the result and retries until its deadline, then hands the job back (a hand-back
    # needs no memory), and lives on.
    worker = Worker(queue, lambda: None, name="w")
    worker.store_retry_s = 0.5
    worker._active = [running]
    started = time.monotonic()
    assert worker._write(lambda: queue.complete(running, [b"img" * 1000], {"count": 1})) is None
    assert 0.5 <= time.monotonic() - started < 5
    assert run(queue.get(job.id)).status == QUEUED and worker._active == []

    client.flushdb()  # room again (the job is gone with the rest; a fresh one runs)
    client.config_set("maxmemory", "0")
    again, _ = run(queue.submit(new_job(), 10))
    [running] = queue.start("w", queue.reserve("w", 1, 1.0))
    assert worker._write(lambda: queue.complete(running, [b"img"], {"count": 1})) is True
    assert run(queue.get(again.id)).status == SUCCEEDED
