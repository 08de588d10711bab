"""The two third-party clients behind one small synchronous interface, so that every test
is written once and run with each client, transport and protocol:

- signalrcore 1.0.2 (thread-based; negotiates without `negotiateVersion`, i.e. version 0,
  and sends handshake version 0 or 1): WebSockets, Server-Sent Events and Long Polling.
- pysignalr 1.3.3 (asyncio; run here on a loop in a background thread): WebSockets.

Every wait has a deadline that only a hang reaches.
"""

import asyncio
import contextlib
import logging
import queue
import threading
import uuid

from pysignalr.client import SignalRClient
from pysignalr.protocol.json import JSONProtocol
from pysignalr.protocol.messagepack import MessagepackProtocol
from signalrcore.hub.handlers import StreamHandler
from signalrcore.hub_connection_builder import HubConnectionBuilder
from signalrcore.messages.stream_invocation_message import StreamInvocationMessage
from signalrcore.protocol.messagepack_protocol import MessagePackHubProtocol
from signalrcore.types import HttpTransportType

WAIT = 15


class HubError(Exception):
    """A Completion with an error."""


class Calls:
    """What the server called on a client: (target, arguments), in order."""

    def __init__(self):
        self.items = queue.Queue()

    def put(self, target, arguments):
        self.items.put((target, arguments))

    def wait_for(self, target, predicate=lambda args: True, timeout=WAIT):
        skipped = []
        try:
            while True:
                name, args = self.items.get(timeout=timeout)
                if name == target and predicate(args):
                    return args
                skipped.append((name, args))
        except queue.Empty:
            raise AssertionError(
                f"no call of {target} matching within {timeout}s; got {skipped!r}"
            ) from None


class Signalrcore:
    name = "signalrcore"

    def __init__(self, url, transport, protocol, reconnect=True):
        builder = HubConnectionBuilder().with_url(
            f"{url}/chat", options={"transport": HttpTransportType[transport]}
        )
        builder = builder.configure_logging(logging.CRITICAL)
        if protocol == "messagepack":
            builder = builder.with_hub_protocol(MessagePackHubProtocol())
        if reconnect:
            builder = builder.with_automatic_reconnect(
                # The keep-alive interval also bounds how long `stop()` waits for the
                # client's checker thread.
                {"type": "raw", "reconnect_interval": 1, "max_attempts": 60, "keep_alive_interval": 2}
            )
        self.hub = builder.build()
        self.calls = Calls()
        self.opened = threading.Event()
        self.errors = {}
        self.hub.on_open(self.opened.set)
        self.hub.on_reconnect(self.opened.set)
        self.hub.on_error(self._on_error)
        for target in ("Send", "ReceiveMessage"):
            self.hub.on(target, lambda args, target=target: self.calls.put(target, args))

    def _on_error(self, message):
        waiter = self.errors.get(getattr(message, "invocation_id", None))
        if waiter is not None:
            waiter.put(HubError(message.error))

    def start(self):
        self.opened.clear()
        assert self.hub.start(), "signalrcore: start() failed"
        assert self.opened.wait(WAIT), "signalrcore: the connection did not open"

    def invoke(self, method, arguments, timeout=WAIT):
        answers = queue.Queue()
        # Registered before sending: the answer may come before `invoke` returns.
        invocation_id = str(uuid.uuid4())
        self.errors[invocation_id] = answers
        self.hub.invoke(method, arguments, answers.put, invocation_id)
        try:
            answer = answers.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"signalrcore: no completion of {method} in {timeout}s") from None
        finally:
            self.errors.pop(invocation_id, None)
        if isinstance(answer, HubError):
            raise answer
        return answer.result

    def send(self, method, arguments):
        self.hub.invoke(method, arguments)

    def stream(self, method, arguments, timeout=WAIT):
        items, done = [], threading.Event()
        # `hub.stream()` sends before it returns the handler to subscribe to, so the first
        # items can come before anyone listens: the same steps, subscribed first.
        invocation_id = str(uuid.uuid4())
        handler = StreamHandler(method, invocation_id)
        handler.subscribe(
            {
                "next": items.append,
                "complete": lambda _: done.set(),
                "error": lambda error: done.set(),
            }
        )
        self.hub.stream_handlers[invocation_id].append(handler)
        self.hub.transport.send(StreamInvocationMessage(invocation_id, method, arguments))
        assert done.wait(timeout), f"signalrcore: the stream {method} did not end; got {items}"
        return items

    def wait_reconnected(self, timeout):
        assert self.opened.wait(timeout), "signalrcore: no reconnect"

    def stop(self):
        try:
            self.hub.stop()
        except Exception:  # noqa: BLE001 - best effort at teardown
            pass


class Pysignalr:
    name = "pysignalr"

    def __init__(self, url, transport, protocol, reconnect=True):
        assert transport == "web_sockets", "pysignalr speaks WebSockets only"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        chosen = MessagepackProtocol() if protocol == "messagepack" else JSONProtocol()
        self.client = SignalRClient(
            f"{url}/chat", protocol=chosen, retry_sleep=0.5, retry_multiplier=1, retry_count=60
        )
        self.calls = Calls()
        self.opened = threading.Event()
        self.errors = {}
        self.task = None

        async def on_open():
            self.opened.set()

        async def on_error(message):
            waiter = self.errors.pop(None, None)
            if waiter is not None:
                waiter.put(HubError(message.error))

        self.client.on_open(on_open)
        self.client.on_error(on_error)
        for target in ("Send", "ReceiveMessage"):

            async def handler(args, target=target):
                self.calls.put(target, args)

            self.client.on(target, handler)

    def _run(self, coroutine, timeout=WAIT):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def start(self):
        async def begin():
            self.task = asyncio.ensure_future(self.client.run())

        self._run(begin())
        assert self.opened.wait(WAIT), "pysignalr: the connection did not open"

    def invoke(self, method, arguments, timeout=WAIT):
        answers = queue.Queue()
        # pysignalr reports errors to one global callback without the id: one call at a time.
        self.errors[None] = answers

        async def on_invocation(message):
            answers.put(message)

        self._run(self.client.send(method, arguments, on_invocation))
        try:
            answer = answers.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"pysignalr: no completion of {method} in {timeout}s") from None
        finally:
            self.errors.pop(None, None)
        if isinstance(answer, HubError):
            raise answer
        return answer.result

    def send(self, method, arguments):
        self._run(self.client.send(method, arguments))

    def stream(self, method, arguments, timeout=WAIT):
        items, done = [], threading.Event()

        async def on_next(item):
            items.append(item)

        async def on_complete(_message):
            done.set()

        async def on_error(_message):
            done.set()

        self._run(self.client.stream(method, arguments, on_next, on_complete, on_error))
        assert done.wait(timeout), f"pysignalr: the stream {method} did not end; got {items}"
        return items

    def wait_reconnected(self, timeout):
        assert self.opened.wait(timeout), "pysignalr: no reconnect"

    def stop(self):
        async def end():
            if self.task is not None:
                self.task.cancel()
                with contextlib.suppress(BaseException):
                    await self.task
            # The client's own tasks (keep-alive, websockets) end with it, not after.
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        with contextlib.suppress(Exception):
            self._run(end())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# Every combination each client supports. signalrcore 1.0.2 cannot use MessagePack on
# Server-Sent Events (the transport is text-only, the server refuses it as ASP.NET does)
# nor on Long Polling (its binary long-polling client fails in its constructor and splits
# records at 0x1E, which MessagePack does not use): those are the client's limits.
COMBINATIONS = [
    (Signalrcore, "web_sockets", "json"),
    (Signalrcore, "web_sockets", "messagepack"),
    (Signalrcore, "server_sent_events", "json"),
    (Signalrcore, "long_polling", "json"),
    (Pysignalr, "web_sockets", "json"),
    (Pysignalr, "web_sockets", "messagepack"),
]
