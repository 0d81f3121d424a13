"""{{name}}: a wasm-echo plugin. It sends every UDP datagram and TCP message
back unchanged, and stops the listener when a peer says `exit`. Change
`answer` (and the rest) to make it yours; wit/plugin.wit documents every
type and function.

`wit_world` is the binding componentize-py generates from wit/ when it
builds (`componentize-py -d wit -w plugin bindings .` writes it out for an
editor to read).
"""

from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import Connection, Decision, Endpoint, Next


def answer(data: bytes) -> Decision:
    """Decides what to do with one datagram or one TCP message."""
    if data.strip(b" \t\n\f\r").lower() == b"exit":
        return Decision(None, Next.STOP_LISTENER)
    return Decision(data, Next.CARRY_ON)


class Udp(exports.Udp):
    def on_datagram(self, peer: Endpoint, data: bytes) -> Decision:
        return answer(data)


class Tcp(exports.Tcp):
    """Every TCP connection gets its own instance: module globals are that
    connection's state."""

    def on_open(self, conn: Connection) -> Decision:
        host.log(host.Level.DEBUG, f"connection from {conn.peer.ip}:{conn.peer.port}")
        return Decision(None, Next.CARRY_ON)

    def on_message(self, data: bytes) -> Decision:
        return answer(data)

    def on_close(self) -> None:
        pass
