"""The SSE writer (server/api/responses.py EventStream) through the ASGI interface: events held while the next one
is already at hand go out together, byte for byte the same stream; a writer that keeps up sends one event a write."""
import asyncio

from server.api.responses import MAX_COALESCED, EventStream


def run_stream(events: list[bytes], behind: list[bool] | None):
    """Drive EventStream over `events`; behind[i] is what is_behind() says after event i. The body writes."""
    said = iter(behind or [])

    async def gen():
        for e in events:
            yield e

    async def main():
        sent = []

        async def receive():
            await asyncio.sleep(3600)  # the client never goes away

        async def send(message):
            sent.append(message)

        stream = EventStream(gen(), (lambda: next(said)) if behind is not None else None)
        await stream(None, receive, send)
        return sent

    sent = asyncio.run(main())
    assert sent[0]["type"] == "http.response.start" and sent[-1]["more_body"] is False
    return [m["body"] for m in sent[1:]]


EVENTS = [f"data: {i}\n\n".encode() for i in range(7)]


def test_a_writer_that_keeps_up_sends_each_event_on_its_own():
    assert run_stream(EVENTS, None) == EVENTS + [b""]
    assert run_stream(EVENTS, [False] * 7) == EVENTS + [b""]


def test_events_at_hand_go_out_together_and_the_bytes_are_the_same():
    behind = [True, True, False, False, True, False, True]  # the last one held until the stream ends
    writes = run_stream(EVENTS, behind)
    assert writes == [b"".join(EVENTS[:3]), EVENTS[3], b"".join(EVENTS[4:6]), EVENTS[6]]
    assert b"".join(writes) == b"".join(EVENTS)


def test_no_more_than_max_coalesced_events_are_held():
    events = [f"data: {i}\n\n".encode() for i in range(2 * MAX_COALESCED + 5)]
    writes = run_stream(events, [True] * len(events))
    assert b"".join(writes) == b"".join(events)
    assert max(w.count(b"data: ") for w in writes) == MAX_COALESCED + 1
