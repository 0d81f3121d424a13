"""The `counter` plugin in Python: answers each TCP message with how many
its connection has sent, and each datagram with how many its peer has sent,
and hands its counts to the next version when a reload swaps it.

It targets the `stateful-plugin` world and writes the Rust counter's format
(schema 1: the connection's count on the first line, then `ip:port count`
for each UDP peer), so either can take over from the other.

Built into a component by scripts/build-polyglot.sh with componentize-py;
`wit_world` is the binding it generates from ../../wit at build time.
"""

from typing import Dict, Optional

from wit_world import exports
from wit_world.exports.state import SavedState
from wit_world.imports.types import Connection, Decision, Endpoint, Next, VersionInfo
from componentize_py_types import Err

SCHEMA = 1

messages = 0
peers: Dict[str, int] = {}


def reply(count: int) -> Decision:
    return Decision(str(count).encode(), Next.CARRY_ON)


class Udp(exports.Udp):
    def on_datagram(self, peer: Endpoint, data: bytes) -> Decision:
        key = f"{peer.ip}:{peer.port}"
        peers[key] = peers.get(key, 0) + 1
        return reply(peers[key])


class Tcp(exports.Tcp):
    def on_open(self, conn: Connection) -> Decision:
        return Decision(None, Next.CARRY_ON)

    def on_message(self, data: bytes) -> Decision:
        global messages
        messages += 1
        return reply(messages)

    def on_close(self) -> None:
        pass


class State(exports.State):
    def snapshot(self) -> Optional[SavedState]:
        lines = [str(messages)] + [f"{peer} {count}" for peer, count in peers.items()]
        return SavedState(SCHEMA, ("\n".join(lines) + "\n").encode())

    def restore(self, previous: VersionInfo, state: SavedState) -> None:
        global messages, peers
        if state.schema != SCHEMA:
            raise Err(f"unknown schema {state.schema} (this version reads {SCHEMA})")
        try:
            first, *rest = state.data.decode().splitlines()
            counts = {}
            for line in rest:
                peer, count = line.rsplit(" ", 1)
                counts[peer] = int(count)
            messages, peers = int(first), counts
        except ValueError as error:
            raise Err(f"not schema 1: {error}")
