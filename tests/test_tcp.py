"""TcpStream and accept(): the stream contract of trio.SocketStream, on real loopback sockets."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import pytest
import trio

from dtgserver.server.tcp import TcpStream, accept, peer_text


async def pair() -> tuple[TcpStream, trio.SocketStream, trio.SocketListener]:
    """(the server's TcpStream, the client's SocketStream, the listener) over 127.0.0.1."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    server = await accept(listener)
    return server, client, listener


@pytest.fixture
async def streams() -> AsyncIterator[tuple[TcpStream, trio.SocketStream]]:
    server, client, listener = await pair()
    try:
        yield server, client
    finally:
        server.socket.close()
        client.socket.close()
        listener.socket.close()


async def test_accept_reports_the_peer_as_the_client_sees_itself(
        streams: tuple[TcpStream, trio.SocketStream]) -> None:
    server, client = streams
    host, port = client.socket.getsockname()[:2]
    assert server.peer == f"{host}:{port}"
    assert isinstance(server, trio.abc.HalfCloseableStream)


async def test_bytes_both_ways_and_eof(streams: tuple[TcpStream, trio.SocketStream]) -> None:
    server, client = streams
    await client.send_all(b"\x03" * 3083)
    received = b""
    while len(received) < 3083:
        received += await server.receive_some(65536)
    assert received == b"\x03" * 3083
    await server.send_all(b"\x09\x00")
    assert await client.receive_some(10) == b"\x09\x00"
    await client.send_eof()
    assert await server.receive_some() == b""


async def test_send_all_sends_more_than_one_send_takes(streams: tuple[TcpStream, trio.SocketStream]) -> None:
    server, client = streams
    data = bytes(range(256)) * 16384  # 4 MiB: far beyond the socket buffers, so several sends
    received = bytearray()

    async def read() -> None:
        while len(received) < len(data):
            received.extend(await client.receive_some(1 << 20))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read)
        await server.send_all(data)
    assert bytes(received) == data


async def test_send_eof_is_seen_by_the_peer_and_closes_sending_only(
        streams: tuple[TcpStream, trio.SocketStream]) -> None:
    server, client = streams
    await server.send_eof()
    await server.send_eof()  # a second one is a no-op, as in trio.SocketStream
    assert await client.receive_some(10) == b""
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"\x09\x00")
    await client.send_all(b"still readable")
    assert await server.receive_some(100) == b"still readable"


async def test_a_reset_peer_is_a_broken_stream(streams: tuple[TcpStream, trio.SocketStream]) -> None:
    server, client = streams
    client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    client.socket.close()  # linger 0: the kernel answers with a reset
    with pytest.raises(trio.BrokenResourceError):
        await server.receive_some(10)
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(10):  # the first send after a reset may still be buffered
            await server.send_all(b"\x09\x00")
            await trio.sleep(0.01)


async def test_a_closed_stream_says_closed(streams: tuple[TcpStream, trio.SocketStream]) -> None:
    server, _ = streams
    await server.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await server.receive_some(10)
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"\x09\x00")
    with pytest.raises(trio.ClosedResourceError):
        await server.send_all(b"")
    with pytest.raises(trio.ClosedResourceError):
        await server.wait_send_all_might_not_block()


async def test_wait_send_all_might_not_block_returns_on_an_open_socket(
        streams: tuple[TcpStream, trio.SocketStream]) -> None:
    server, _ = streams
    with trio.fail_after(5):
        await server.wait_send_all_might_not_block()
        await server.send_all(b"")  # empty: a checkpoint, nothing sent


def test_peer_text_of_ipv4_ipv6_and_odd_addresses() -> None:
    assert peer_text(("127.0.0.1", 5000)) == "127.0.0.1:5000"
    assert peer_text(("::1", 5000, 0, 0)) == "::1:5000"
    assert peer_text("") == "unknown"
    assert peer_text(None) == "unknown"
