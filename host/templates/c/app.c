// {{name}}: a wasm-echo plugin. It sends every UDP datagram and TCP message
// back unchanged, and stops the listener when a peer says `exit`. Change
// `answer` (and the rest) to make it yours; wit/plugin.wit documents every
// type and function, and .build/bindings/plugin.h (written by build.sh)
// their C names.

#include <stdio.h>
#include <string.h>

#include "plugin.h"

typedef wasm_echo_plugin_types_decision_t decision_t;

// `exit` in any ASCII case, with ASCII whitespace around it.
static bool is_exit(const uint8_t *p, size_t n) {
    static const char space[] = " \t\n\f\r";
    while (n > 0 && memchr(space, p[0], sizeof space - 1)) p++, n--;
    while (n > 0 && memchr(space, p[n - 1], sizeof space - 1)) n--;
    if (n != 4) return false;
    for (size_t i = 0; i < 4; i++) {
        if ((p[i] | 0x20) != (uint8_t)"exit"[i]) return false;
    }
    return true;
}

// Decides what to do with one datagram or one TCP message. Owns `data`:
// the reply takes over its buffer, and the bindings free it once the host
// has copied it out.
static void answer(plugin_list_u8_t *data, decision_t *ret) {
    if (is_exit(data->ptr, data->len)) {
        plugin_list_u8_free(data);
        ret->reply.is_some = false;
        ret->next = WASM_ECHO_PLUGIN_TYPES_NEXT_STOP_LISTENER;
        return;
    }
    ret->reply.is_some = true;
    ret->reply.val = *data;
    ret->next = WASM_ECHO_PLUGIN_TYPES_NEXT_CARRY_ON;
}

void exports_wasm_echo_plugin_udp_on_datagram(exports_wasm_echo_plugin_udp_endpoint_t *peer,
                                              plugin_list_u8_t *data, decision_t *ret) {
    exports_wasm_echo_plugin_udp_endpoint_free(peer);
    answer(data, ret);
}

// Every TCP connection gets its own instance: globals are that
// connection's state.
void exports_wasm_echo_plugin_tcp_on_open(exports_wasm_echo_plugin_tcp_connection_t *conn, decision_t *ret) {
    char line[96];
    snprintf(line, sizeof line, "connection from %.*s:%u", (int)conn->peer.ip.len,
             (const char *)conn->peer.ip.ptr, (unsigned)conn->peer.port);
    plugin_string_t message;
    plugin_string_set(&message, line);
    wasm_echo_plugin_host_log(WASM_ECHO_PLUGIN_HOST_LEVEL_DEBUG, &message);
    exports_wasm_echo_plugin_tcp_connection_free(conn);
    ret->reply.is_some = false;
    ret->next = WASM_ECHO_PLUGIN_TYPES_NEXT_CARRY_ON;
}

void exports_wasm_echo_plugin_tcp_on_message(plugin_list_u8_t *data, decision_t *ret) {
    answer(data, ret);
}

void exports_wasm_echo_plugin_tcp_on_close(void) {}
