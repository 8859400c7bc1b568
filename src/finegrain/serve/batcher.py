"""Micro-batching: concurrent requests wait at most a few milliseconds in a queue, then run as one batch.

One worker task owns the queue. It takes the first waiting item, everything else already queued (up to `max_batch`),
then waits at most `max_wait_ms` for more; the batch runs in a single model thread (torch releases the GIL, so the
event loop keeps accepting requests meanwhile) and each caller's future gets its own row. While a batch runs, new
requests pile up and form the next batch: under load the batch size grows by itself, idle it stays 1 with no wait
beyond `max_wait_ms`. `max_batch=1` serves one image at a time (the baseline of the benchmark).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Any


def _settle(fut: asyncio.Future, *, result: Any = None, error: BaseException | None = None) -> None:
    if fut.done():  # its caller went away
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


class MicroBatcher:
    """`await submit(item)` -> run_batch([..., item, ...])[its position], with items batched across callers."""

    def __init__(
        self,
        run_batch: Callable[[Sequence[Any]], Sequence[Any]],
        *,
        executor: Executor,
        max_batch: int = 16,
        max_wait_ms: float = 5.0,
    ) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms >= 0; got {max_batch}, {max_wait_ms}")
        self.run_batch, self.executor = run_batch, executor
        self.max_batch, self.max_wait = max_batch, max_wait_ms / 1000.0
        self.batch_sizes: Counter[int] = Counter()
        self.busy_s = 0.0  # seconds spent inside run_batch
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Start the worker on the running event loop."""
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._work(), name="finegrain-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    @property
    def pending(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, item: Any) -> Any:
        if self._queue is None or self._task is None or self._task.done():
            raise RuntimeError("the batcher is not running (start() it inside the server's event loop)")
        future = asyncio.get_running_loop().create_future()
        await self._queue.put((item, future))
        return await future

    async def _collect(self) -> list[tuple[Any, asyncio.Future]]:
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:  # not the builtin before Python 3.11
                break
        return [(item, fut) for item, fut in batch if not fut.done()]  # a caller that went away is dropped

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            start = time.perf_counter()
            try:
                results = await loop.run_in_executor(self.executor, self.run_batch, [item for item, _ in batch])
            except Exception as e:  # noqa: BLE001 - the worker goes on; only the item at fault should fail
                if len(batch) > 1:
                    await self._one_by_one(batch)
                else:
                    _settle(batch[0][1], error=e)
                continue
            finally:
                self.busy_s += time.perf_counter() - start
                self.batch_sizes[len(batch)] += 1
            for (_, fut), result in zip(batch, results):
                _settle(fut, result=result)

    async def _one_by_one(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        """A batch failed: run its items alone, so one bad item fails its own request and no other."""
        loop = asyncio.get_running_loop()
        for item, fut in batch:
            try:
                result = (await loop.run_in_executor(self.executor, self.run_batch, [item]))[0]
            except Exception as e:  # noqa: BLE001 - handed to that item's caller
                _settle(fut, error=e)
            else:
                _settle(fut, result=result)

    def stats(self) -> dict:
        n = sum(self.batch_sizes.values())
        images = sum(size * count for size, count in self.batch_sizes.items())
        return {
            "batches": n,
            "images": images,
            "mean_batch": round(images / n, 3) if n else 0.0,
            "max_batch_seen": max(self.batch_sizes, default=0),
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "busy_s": round(self.busy_s, 3),
            "queued": self.pending,
            "max_batch": self.max_batch,
            "max_wait_ms": self.max_wait * 1000.0,
        }
