// The `echo` plugin in JavaScript: sends every UDP datagram and TCP message
// back unchanged.
// Built into a component by scripts/build-polyglot.sh with componentize-qjs.

export const udp = {
  onDatagram(peer, data) {
    return { reply: data, next: "carry-on" };
  },
};

export const tcp = {
  onOpen(conn) {
    return { reply: undefined, next: "carry-on" };
  },
  onMessage(data) {
    return { reply: data, next: "carry-on" };
  },
  onClose() {},
};
