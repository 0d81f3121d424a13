"""The `hello` plugin in Python: greets every UDP datagram and TCP message,
and stops the listener when a peer says `exit`.

Built into a component by scripts/build-polyglot.sh with componentize-py;
`wit_world` is the binding it generates from ../../wit at build time.
"""

from wit_world import exports
from wit_world.imports import host
from wit_world.imports.types import Connection, Decision, Endpoint, Next


def greeting(key: str, default: str) -> bytes:
    """The configured greeting `key`, or `default` when it is not set."""
    value = host.get_config(key)
    return (default if value is None else value).encode()


def is_exit(data: bytes) -> bool:
    """The same test as the Rust plugin: `exit` in any ASCII case, with ASCII
    whitespace around it (what is left after a lossy UTF-8 decode and a strip)."""
    return data.strip(b" \t\n\f\r").lower() == b"exit"


def answer(data: bytes, key: str, default: str) -> Decision:
    """`exit` stops the listener; anything else is greeted."""
    if is_exit(data):
        host.log(host.Level.INFO, "exit requested: stopping the listener")
        return Decision(None, Next.STOP_LISTENER)
    return Decision(greeting(key, default), Next.CARRY_ON)


class Udp(exports.Udp):
    def on_datagram(self, peer: Endpoint, data: bytes) -> Decision:
        return answer(data, "udp-greeting", "Hello, client!")


class Tcp(exports.Tcp):
    def on_open(self, conn: Connection) -> Decision:
        return Decision(None, Next.CARRY_ON)

    def on_message(self, data: bytes) -> Decision:
        return answer(data, "tcp-greeting", "hello, tcp client!")

    def on_close(self) -> None:
        pass
