// The `echo` plugin in C: sends every UDP datagram and TCP message back
// unchanged.
// Built into a component by scripts/build-polyglot.sh; plugin.h is the
// binding wit-bindgen generates from ../../wit at build time.

#include "plugin.h"

typedef wasm_echo_plugin_types_decision_t decision_t;

// The reply takes over the received list's buffer; the bindings free it
// once the host has copied it out.
static void echo(plugin_list_u8_t *data, decision_t *ret) {
    ret->reply.is_some = true;
    ret->reply.val = *data;
    ret->next = WASM_ECHO_PLUGIN_TYPES_NEXT_CARRY_ON;
}

void exports_wasm_echo_plugin_udp_on_datagram(exports_wasm_echo_plugin_udp_endpoint_t *peer,
                                              plugin_list_u8_t *data, decision_t *ret) {
    exports_wasm_echo_plugin_udp_endpoint_free(peer);
    echo(data, ret);
}

void exports_wasm_echo_plugin_tcp_on_open(exports_wasm_echo_plugin_tcp_connection_t *conn, decision_t *ret) {
    exports_wasm_echo_plugin_tcp_connection_free(conn);
    ret->reply.is_some = false;
    ret->next = WASM_ECHO_PLUGIN_TYPES_NEXT_CARRY_ON;
}

void exports_wasm_echo_plugin_tcp_on_message(plugin_list_u8_t *data, decision_t *ret) {
    echo(data, ret);
}

void exports_wasm_echo_plugin_tcp_on_close(void) {}
