// The `hello` plugin in JavaScript: greets every UDP datagram and TCP
// message, and stops the listener when a peer says `exit`.
// Built into a component by scripts/build-polyglot.sh with componentize-qjs
// (the QuickJS engine, which has no TextEncoder or TextDecoder: the two
// helpers below do their part of the work).

import { log, getConfig } from "wasm-echo:plugin/host@0.2.0";

// The UTF-8 bytes of `text`; a lone surrogate becomes U+FFFD, as
// TextEncoder makes it.
function utf8(text) {
  const bytes = [];
  for (const ch of text) {
    let c = ch.codePointAt(0);
    if (c >= 0xd800 && c <= 0xdfff) c = 0xfffd;
    if (c < 0x80) {
      bytes.push(c);
    } else if (c < 0x800) {
      bytes.push(0xc0 | (c >> 6), 0x80 | (c & 0x3f));
    } else if (c < 0x10000) {
      bytes.push(0xe0 | (c >> 12), 0x80 | ((c >> 6) & 0x3f), 0x80 | (c & 0x3f));
    } else {
      bytes.push(0xf0 | (c >> 18), 0x80 | ((c >> 12) & 0x3f), 0x80 | ((c >> 6) & 0x3f), 0x80 | (c & 0x3f));
    }
  }
  return new Uint8Array(bytes);
}

// The configured greeting `key`, or `fallback` when it is not set.
function greeting(key, fallback) {
  const value = getConfig(key);
  return utf8(value ?? fallback);
}

// ASCII whitespace: what the Rust plugin strips around `exit`.
const SPACE = [0x20, 0x09, 0x0a, 0x0c, 0x0d];

// The same test as the Rust plugin: `exit` in any ASCII case, with ASCII
// whitespace around it. Tested on the bytes: no byte of a multi-byte UTF-8
// sequence (nor of one that is not UTF-8) is ASCII, so decoding first would
// not change the answer.
function isExit(data) {
  let start = 0;
  let end = data.length;
  while (start < end && SPACE.includes(data[start])) start++;
  while (end > start && SPACE.includes(data[end - 1])) end--;
  if (end - start !== 4) return false;
  return String.fromCharCode(...data.subarray(start, end)).toLowerCase() === "exit";
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
