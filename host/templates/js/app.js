// {{name}}: a wasm-echo plugin. It sends every UDP datagram and TCP message
// back unchanged, and stops the listener when a peer says `exit`. Change
// `answer` (and the rest) to make it yours; wit/plugin.wit documents every
// type and function. Bytes arrive and leave as Uint8Array.
//
// The engine is QuickJS: the language is modern JavaScript, but Web APIs
// such as TextEncoder, TextDecoder or fetch are not there.

import { log } from "wasm-echo:plugin/host@0.2.0";

// ASCII whitespace, stripped around `exit`.
const SPACE = [0x20, 0x09, 0x0a, 0x0c, 0x0d];

// Is `data` the word `exit`, in any ASCII case, with whitespace around it?
function isExit(data) {
  let start = 0;
  let end = data.length;
  while (start < end && SPACE.includes(data[start])) start++;
  while (end > start && SPACE.includes(data[end - 1])) end--;
  if (end - start !== 4) return false;
  return String.fromCharCode(...data.subarray(start, end)).toLowerCase() === "exit";
}

// Decides what to do with one datagram or one TCP message.
function answer(data) {
  if (isExit(data)) {
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
