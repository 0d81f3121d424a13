// The `hello` plugin in C: greets every UDP datagram and TCP message, and
// stops the listener when a peer says `exit`.
// Built into a component by scripts/build-polyglot.sh; plugin.h is the
// binding wit-bindgen generates from ../../wit at build time.

#include <stdlib.h>
#include <string.h>

#include "plugin.h"

typedef wasm_echo_plugin_types_decision_t decision_t;

// The same test as the Rust plugin: `exit` in any ASCII case, with ASCII
// whitespace around it (what is left after a lossy UTF-8 decode and a strip).
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

// `exit` stops the listener; anything else gets the greeting configured
// under `key`, or `fallback` when that is not set. Frees `data`.
static void answer(plugin_list_u8_t *data, const char *key, const char *fallback, decision_t *ret) {
    bool stop = is_exit(data->ptr, data->len);
    plugin_list_u8_free(data);
    if (stop) {
        plugin_string_t message;
        plugin_string_set(&message, "exit requested: stopping the listener");
        wasm_echo_plugin_host_log(WASM_ECHO_PLUGIN_HOST_LEVEL_INFO, &message);
        ret->reply.is_some = false;
        ret->next = WASM_ECHO_PLUGIN_TYPES_NEXT_STOP_LISTENER;
        return;
    }
    plugin_string_t name, greeting;
    plugin_string_set(&name, key);
    if (!wasm_echo_plugin_host_get_config(&name, &greeting)) {
        plugin_string_dup(&greeting, fallback);
    }
    // The reply takes over the string's buffer; the bindings free it once
    // the host has copied it out.
    ret->reply.is_some = true;
    ret->reply.val.ptr = greeting.ptr;
    ret->reply.val.len = greeting.len;
    ret->next = WASM_ECHO_PLUGIN_TYPES_NEXT_CARRY_ON;
}

void exports_wasm_echo_plugin_udp_on_datagram(exports_wasm_echo_plugin_udp_endpoint_t *peer,
                                              plugin_list_u8_t *data, decision_t *ret) {
    exports_wasm_echo_plugin_udp_endpoint_free(peer);
    answer(data, "udp-greeting", "Hello, client!", ret);
}

void exports_wasm_echo_plugin_tcp_on_open(exports_wasm_echo_plugin_tcp_connection_t *conn, decision_t *ret) {
    exports_wasm_echo_plugin_tcp_connection_free(conn);
    ret->reply.is_some = false;
    ret->next = WASM_ECHO_PLUGIN_TYPES_NEXT_CARRY_ON;
}

void exports_wasm_echo_plugin_tcp_on_message(plugin_list_u8_t *data, decision_t *ret) {
    answer(data, "tcp-greeting", "hello, tcp client!", ret);
}

void exports_wasm_echo_plugin_tcp_on_close(void) {}
