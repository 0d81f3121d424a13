// The `hello` plugin in JavaScript: greets every UDP datagram and TCP
// message, and stops the listener when a peer says `exit`.
// Built into a component by scripts/build-polyglot.sh with componentize-js.

import { log, getConfig } from "wasm-echo:plugin/host@0.2.0";

const encoder = new TextEncoder();
const decoder = new TextDecoder(); // lossy: bad bytes become U+FFFD

// The configured greeting `key`, or `fallback` when it is not set.
function greeting(key, fallback) {
  const value = getConfig(key);
  return encoder.encode(value ?? fallback);
}

// The same test as the Rust plugin: `exit` in any ASCII case, with ASCII
// whitespace around it (what is left after a lossy UTF-8 decode and a strip).
function isExit(data) {
  const text = decoder.decode(data).replace(/^[ \t\n\f\r]+|[ \t\n\f\r]+$/g, "");
  return text.toLowerCase() === "exit";
}

// `exit` stops the listener; anything else is greeted.
function answer(data, key, fallback) {
  if (isExit(data)) {
    log("info", "exit requested: stopping the listener");
    return { reply: undefined, next: "stop-listener" };
  }
  return { reply: greeting(key, fallback), next: "carry-on" };
}

export const udp = {
  onDatagram(peer, data) {
    return answer(data, "udp-greeting", "Hello, client!");
  },
};

export const tcp = {
  onOpen(conn) {
    return { reply: undefined, next: "carry-on" };
  },
  onMessage(data) {
    return answer(data, "tcp-greeting", "hello, tcp client!");
  },
  onClose() {},
};
