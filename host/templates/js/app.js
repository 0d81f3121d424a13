// {{name}}: a wasm-echo plugin. It sends every UDP datagram and TCP message
// back unchanged, and stops the listener when a peer says `exit`. Change
// `answer` (and the rest) to make it yours; wit/plugin.wit documents every
// type and function. Bytes arrive and leave as Uint8Array.

import { log } from "wasm-echo:plugin/host@0.2.0";

const decoder = new TextDecoder(); // lossy: bytes that are not UTF-8 become U+FFFD

// Decides what to do with one datagram or one TCP message.
function answer(data) {
  const text = decoder.decode(data).replace(/^[ \t\n\f\r]+|[ \t\n\f\r]+$/g, "");
  if (text.toLowerCase() === "exit") {
    return { reply: undefined, next: "stop-listener" };
  }
  return { reply: data, next: "carry-on" };
}

export const udp = {
  onDatagram(peer, data) {
    return answer(data);
  },
};

// Every TCP connection gets its own instance: module variables are that
// connection's state.
export const tcp = {
  onOpen(conn) {
    log("debug", `connection from ${conn.peer.ip}:${conn.peer.port}`);
    return { reply: undefined, next: "carry-on" };
  },
  onMessage(data) {
    return answer(data);
  },
  onClose() {},
};
