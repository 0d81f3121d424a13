"""The `echo` plugin in Python: sends every UDP datagram and TCP message
back unchanged.

Built into a component by scripts/build-polyglot.sh with componentize-py;
`wit_world` is the binding it generates from ../../wit at build time.
"""

from wit_world import exports
from wit_world.imports.types import Connection, Decision, Endpoint, Next


class Udp(exports.Udp):
    def on_datagram(self, peer: Endpoint, data: bytes) -> Decision:
        return Decision(data, Next.CARRY_ON)


class Tcp(exports.Tcp):
    def on_open(self, conn: Connection) -> Decision:
        return Decision(None, Next.CARRY_ON)

    def on_message(self, data: bytes) -> Decision:
        return Decision(data, Next.CARRY_ON)

    def on_close(self) -> None:
        pass
