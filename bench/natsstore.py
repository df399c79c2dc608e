"""What it costs to run nats-py beside Trio, and the JetStream store's PubAck rate, in one run.

1. Hand-off round trip, no network: Trio → the NATS thread's asyncio loop → back to Trio
   (`NatsLink.call` of an empty coroutine), against the baseline of Trio's own thread hand-off
   (`trio.to_thread.run_sync` of an empty function), measured in the same run.
2. Packets through the store: `JetStreamStore.submit` from K concurrent Trio tasks to a local
   3-node cluster (R3, started here on free loopback ports), against the floor of nats-py alone:
   `publish_async` of the same messages from plain asyncio with K in flight, no Trio, no hand-off.
   The ratio is what the thread, the hand-offs and the store's bookkeeping cost.

    .venv/bin/python bench/natsstore.py [--packets 3000] [--concurrency 64]

Prints figures and ratios; no thresholds (docs/performance.md records them with the command).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from natscluster import NatsCluster  # noqa: E402

from dtgserver.protocol import Connection, Received, Role, encode  # noqa: E402
from dtgserver.store.jetstream import NatsBackend, NatsOptions, StoreUrl  # noqa: E402
from dtgserver.store.jetstream.packets import JetStreamStore  # noqa: E402


def received(packets: list[bytes]) -> list[Received]:
    out = []
    for raw in packets:
        conn = Connection(Role.SERVER)
        conn.receive_data(raw)
        event = conn.next_event()
        assert isinstance(event, Received)
        out.append(event)
    return out


def make_packets(count: int, tag: int) -> list[bytes]:
    from dtgserver.testing import dtg

    return [encode(dtg(f"0{tag}{i:09d}"[:11], bodies=60)) for i in range(count)]


async def handoffs(link: object, rounds: int) -> tuple[float, float]:
    async def nothing() -> None:
        return None

    started = time.perf_counter()
    for _ in range(rounds):
        await link.call(nothing())  # type: ignore[attr-defined]
    across = (time.perf_counter() - started) / rounds
    started = time.perf_counter()
    for _ in range(rounds):
        await trio.to_thread.run_sync(lambda: None)
    thread = (time.perf_counter() - started) / rounds
    return across, thread


async def through_store(url: str, items: list[Received], concurrency: int, rounds: int) -> tuple[float, float]:
    backend = NatsBackend(NatsOptions(StoreUrl.parse(url)), name="bench")
    store = JetStreamStore(backend, queue_high_water=10 * concurrency)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            with trio.fail_after(60):
                while store.overloaded():
                    await trio.sleep(0.05)
            half = len(items) // 2
            send_channel, receive_channel = trio.open_memory_channel[Received](len(items))
            for item in items[:half]:
                send_channel.send_nowait(item)
            send_channel.close()
            failures = 0

            async def worker() -> None:
                nonlocal failures
                async for item in receive_channel:
                    if int(await store.submit(item, "127.0.0.1:1")) != 0:
                        failures += 1

            started = time.perf_counter()
            cpu = time.process_time()
            async with trio.open_nursery() as workers:
                for _ in range(concurrency):
                    workers.start_soon(worker)
            elapsed, cpu_used = time.perf_counter() - started, time.process_time() - cpu
            assert failures == 0, failures
            nursery.cancel_scope.cancel()
        stats = store.stats
        print(f"  store: {stats.commits} batches of PubAcks back, {stats.batch_size_sum / max(stats.commits, 1):.1f} "
              f"packets each; at most {store.max_in_flight} in flight; {store.retries} publishes sent again")
        return half / elapsed, cpu_used / half
    finally:
        backend.close()


def floor_asyncio(url: str, items: list[Received], concurrency: int) -> tuple[float, float]:
    import nats

    from dtgserver.store.jetstream.backend import subject
    from dtgserver.store.packets import digest, shard_of

    async def main() -> tuple[float, float]:
        nc = await nats.connect(servers=StoreUrl.parse(url).servers)
        js = nc.jetstream()
        semaphore = asyncio.Semaphore(concurrency)
        rest = items[len(items) // 2:]

        async def one(item: Received) -> None:
            async with semaphore:
                future = await js.publish_async(subject(shard_of(item.modem, 16), item.modem), item.raw, headers={
                    "Nats-Msg-Id": digest(item.raw).hex(), "Dtg-Received-At": repr(time.time()),
                    "Dtg-Peer": "127.0.0.1:1", "Dtg-Kind": item.kind})
                await future

        started = time.perf_counter()
        cpu = time.process_time()
        await asyncio.gather(*(one(item) for item in rest))
        result = len(rest) / (time.perf_counter() - started), (time.process_time() - cpu) / len(rest)
        await nc.close()
        return result

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packets", type=int, default=3000, help="packets per round (half each contender)")
    parser.add_argument("--concurrency", type=int, default=64, help="publishes in flight")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--handoffs", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, NatsCluster(Path(tmp) / "nats") as cluster:
        url = cluster.url
        link_backend = NatsBackend(NatsOptions(StoreUrl.parse(url)), name="bench-handoff")
        try:
            across, thread = trio.run(handoffs, link_backend.link, args.handoffs)
        finally:
            link_backend.close()
        print(f"hand-off round trip Trio→asyncio→Trio: {across * 1e6:.1f} µs; trio.to_thread.run_sync: "
              f"{thread * 1e6:.1f} µs; ratio {across / thread:.2f}")
        store_rates, store_cpu, floor_rates, floor_cpu = [], [], [], []
        for r in range(args.rounds):
            items = received(make_packets(args.packets, r + 1))
            rate, cpu = trio.run(through_store, url, items, args.concurrency, r)
            floor, fcpu = floor_asyncio(url, items, args.concurrency)
            store_rates.append(rate)
            store_cpu.append(cpu)
            floor_rates.append(floor)
            floor_cpu.append(fcpu)
            print(f"round {r + 1}: store {rate:,.0f} packets/s ({cpu * 1e6:.0f} µs CPU each); nats-py alone "
                  f"{floor:,.0f} packets/s ({fcpu * 1e6:.0f} µs); ratio {rate / floor:.2f}")
        ratios = [a / b for a, b in zip(store_rates, floor_rates, strict=True)]
        print(f"median: store {statistics.median(store_rates):,.0f} packets/s at "
              f"{statistics.median(store_cpu) * 1e6:.0f} µs CPU, nats-py alone "
              f"{statistics.median(floor_rates):,.0f} at {statistics.median(floor_cpu) * 1e6:.0f} µs; "
              f"store ÷ floor {statistics.median(ratios):.2f}× (3-node cluster, R3, {args.concurrency} in flight)")


if __name__ == "__main__":
    main()
