"""The embedded transport wakes its readers once per event loop per published batch: a step's events for many
streams read on one loop cost the engine thread one call into that loop, not one per stream."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from gpu_worker.serving.memory_transport import MemoryTransport


class CountingLoop(asyncio.SelectorEventLoop):
    """A real event loop that counts the calls made into it from other threads."""

    def __init__(self) -> None:
        super().__init__()
        self.calls_from_threads = 0

    def call_soon_threadsafe(self, callback: Any, *args: Any, context: Any = None) -> asyncio.Handle:
        self.calls_from_threads += 1
        return super().call_soon_threadsafe(callback, *args, context=context)


def test_one_published_step_wakes_all_its_readers_on_a_loop_with_one_call() -> None:
    transport = MemoryTransport(lambda event: None)
    rids = [f"r{i}" for i in range(12)]
    for rid in rids:
        transport.submit({"request_id": rid, "prompt_token_ids": [1], "submitted_at": time.time()})
    delta = {
        "type": "delta",
        "index": 0,
        "text": "x",
        "token_ids": [7],
        "logprobs": None,
        "finish_reason": None,
    }
    done = {"type": "done", "status": "completed"}

    async def read(rid: str) -> list[str]:
        return [event["type"] async for event in transport.events(rid)]

    async def main(loop: CountingLoop) -> list[list[str]]:
        readers = asyncio.gather(*(read(rid) for rid in rids))
        await asyncio.sleep(0.05)  # every reader waits for its first event
        before = loop.calls_from_threads
        worker = threading.Thread(target=transport.publish, args=([(rid, delta) for rid in rids],))
        worker.start()
        worker.join()
        assert loop.calls_from_threads - before == 1  # twelve waiting readers, one wake-up
        await asyncio.sleep(0.05)
        transport.publish([(rid, done) for rid in rids])
        return await readers

    loop = CountingLoop()
    try:
        seen = loop.run_until_complete(main(loop))
    finally:
        loop.close()
    assert seen == [["delta", "done"]] * len(rids)
