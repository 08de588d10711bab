"""signalrcore and pysignalr (from PyPI, pinned in requirements.txt) against one stickless
instance and a 3-instance cluster behind nginx, on every transport and protocol each
client supports (see `clients.COMBINATIONS`): connect, invoke with a result, send,
broadcast, direct messages by connection id, errors, a server stream, and automatic
reconnect after the client's instance restarts.

Run by scripts/test.sh; alone: `target/interop-venv/bin/pytest tests/python`.
"""

import time
import uuid

import pytest

from clients import COMBINATIONS, HubError

TRANSPORT_NAMES = {
    "web_sockets": "WebSockets",
    "server_sent_events": "ServerSentEvents",
    "long_polling": "LongPolling",
}


def ids(combination):
    client, transport, protocol = combination
    return f"{client.name}-{transport}-{protocol}"


@pytest.fixture(params=COMBINATIONS, ids=ids)
def make(request, deployment):
    """Builds started clients of one combination; stops them after the test."""
    client_class, transport, protocol = request.param
    made = []

    def build():
        client = client_class(deployment.url, transport, protocol)
        made.append(client)
        client.start()
        return client

    build.transport = TRANSPORT_NAMES[transport]
    build.client_name = client_class.name
    build.deployment = deployment
    yield build
    for client in made:
        client.stop()


def test_invoke_send_broadcast_direct_and_errors(make):
    a, b = make(), make()

    who = a.invoke("WhoAmI", [])
    assert who["transport"] == make.transport
    assert who["connectionId"]

    text = f"hello {uuid.uuid4()} hé ✓"
    a.send("Send", [text])
    for client in (a, b):
        assert client.calls.wait_for("Send", lambda args: args == [text]) == [text]

    # By connection id (signalrcore negotiates version 0, where the id is the token).
    direct = f"direct {uuid.uuid4()}"
    # SendTo returns the message sent (docs/chat-hub.md), so the sender can show it.
    sent = b.invoke("SendTo", [who["connectionId"], direct])
    assert sent["text"] == direct and sent["to"] == who["connectionId"], sent
    message = a.calls.wait_for("ReceiveMessage", lambda args: args[0]["text"] == direct)[0]
    assert message == sent

    with pytest.raises(HubError, match="Unknown hub method 'NoSuchMethod'"):
        a.invoke("NoSuchMethod", [])
    with pytest.raises(HubError, match=r"invoking 'SetName' on the server\. HubException: "):
        a.invoke("SetName", [""])
    # The connection is still usable after errors.
    assert a.invoke("WhoAmI", [])["connectionId"] == who["connectionId"]


def test_server_stream(make):
    client = make()
    assert client.stream("Counter", [5, 10]) == [0, 1, 2, 3, 4]


def test_automatic_reconnect_after_the_server_restarts(make):
    if make.client_name == "signalrcore" and make.deployment.kind == "single":
        pytest.skip(
            "signalrcore 1.0.2 tries to reconnect once, at once, and stops its keep-alive "
            "checker on a Close message: a lone server that is restarting is not back yet "
            "(against the cluster it reconnects to another instance; tested there)"
        )
    client = make()
    before = client.invoke("WhoAmI", [])
    client.opened.clear()
    make.deployment.restart(before["instance"])
    client.wait_reconnected(30)

    # Reconnected: a new connection that invokes and receives broadcasts again.
    deadline = time.monotonic() + 30
    while True:
        try:
            after = client.invoke("WhoAmI", [], timeout=5)
            break
        except Exception:  # noqa: BLE001 - not connected yet: try again until the deadline
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    assert after["transport"] == before["transport"]
    text = f"after restart {uuid.uuid4()}"
    client.send("Send", [text])
    client.calls.wait_for("Send", lambda args: args == [text])
