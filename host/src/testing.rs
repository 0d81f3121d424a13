//! What the end-to-end tests and the benchmark share: the paths of the
//! test plugins the build script built, and the hostile-tenant scenarios
//! (each misbehaviour of the `hostile` test plugin, the limits its tenant
//! gets, what its client sees and what the log says). Both run the same
//! scenarios from the same table, so what the tests prove contained is what
//! the benchmark measures beside a good tenant.
//!
//! Nothing here is used by the server itself.

/// Paths of the guest plugins built by `host/build.rs`, as constants: a
/// test or the benchmark names a plugin that exists, or does not compile.
pub mod plugins {
    include!(concat!(env!("OUT_DIR"), "/test_plugins.rs"));
}

/// One hostile tenant: a behaviour of the `hostile` plugin.
#[derive(Clone, Copy, Debug)]
pub struct Scenario {
    /// The `behaviour` setting, and the tenant's name.
    pub behaviour: &'static str,
    /// TOML keys the tenant gets besides `call-timeout = "50ms"` and
    /// `plugin-config = { behaviour = ... }` (either may be overridden).
    pub extra: &'static str,
    /// What a client that sends `probe` gets back: `None` for no UDP reply
    /// and a closed TCP connection.
    pub reply: Option<&'static str>,
    /// What the log says about it, if anything.
    pub logged: Option<&'static str>,
}

/// Every hostile tenant, in the order they are measured.
pub const HOSTILE: &[Scenario] = &[
    Scenario {
        behaviour: "loop",
        extra: "",
        reply: None,
        logged: Some("ran past its 50ms deadline"),
    },
    Scenario {
        behaviour: "bloat",
        extra: "memory-limit = \"16MiB\"\n",
        reply: None,
        logged: Some("tried to grow its memory"),
    },
    Scenario {
        behaviour: "recurse",
        extra: "",
        reply: None,
        // The shadow stack in linear memory runs out before the wasm stack.
        logged: Some("plugin trapped: wasm trap: out of bounds memory access"),
    },
    Scenario {
        behaviour: "panic",
        extra: "",
        reply: None,
        logged: Some("hostile plugin panics on purpose"),
    },
    Scenario {
        behaviour: "huge-reply",
        extra: "",
        reply: None,
        logged: Some("reply of 8388608 bytes"),
    },
    Scenario {
        behaviour: "snoop",
        extra: "",
        reply: Some("files=denied env=0 args=0 tcp=denied udp=denied clock=coarse"),
        logged: None,
    },
    Scenario {
        behaviour: "flood-log",
        extra: "log-rate = 50\ncall-timeout = \"5s\"\n",
        reply: Some("probe"),
        logged: Some("plugin log lines dropped"),
    },
    Scenario {
        behaviour: "slow",
        extra: "plugin-config = { behaviour = \"slow\", slow-ms = \"30\" }\n",
        reply: Some("probe"),
        logged: None,
    },
    Scenario {
        behaviour: "sleep",
        extra: "plugin-config = { behaviour = \"sleep\", sleep-always = \"yes\" }\n",
        reply: None,
        logged: Some("ran past its 50ms deadline"),
    },
];

/// A configuration with a `good` tenant (the built-in `echo`) and one
/// tenant per [`HOSTILE`] scenario, every address `127.0.0.1:0`; `common`
/// is added to every tenant (e.g. `max-connections = 100`).
pub fn hostile_config(common: &str) -> String {
    let mut toml = format!(
        "[listeners.good]\nplugin = \"echo\"\nudp = \"127.0.0.1:0\"\ntcp = \"127.0.0.1:0\"\n{common}\n"
    );
    for scenario in HOSTILE {
        let Scenario {
            behaviour, extra, ..
        } = scenario;
        toml.push_str(&format!(
            "[listeners.{behaviour}]\nplugin = \"{}\"\nudp = \"127.0.0.1:0\"\ntcp = \"127.0.0.1:0\"\n\
             {common}{extra}",
            plugins::HOSTILE
        ));
        if !extra.contains("call-timeout") {
            toml.push_str("call-timeout = \"50ms\"\n");
        }
        if !extra.contains("plugin-config") {
            toml.push_str(&format!(
                "plugin-config = {{ behaviour = \"{behaviour}\" }}\n"
            ));
        }
        toml.push('\n');
    }
    toml
}
