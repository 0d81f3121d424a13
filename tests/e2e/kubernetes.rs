//! The Kubernetes manifests (deploy/kubernetes/): validated offline against
//! the Kubernetes schemas by PyPI's `kubernetes-validate` (in the project's
//! venv, target/venv, made by scripts/bootstrap.sh; it ships the schemas),
//! and held to the configuration they carry: the ConfigMap's TOML passes
//! `wasm-echo check --config`, and the Deployment, the Service and that
//! TOML agree on paths, ports, probes and shutdown timing. No cluster runs
//! here.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::common::{repo_file, run, scratch_file, succeeded};

/// The manifests, in the order a `kubectl apply -f` of the folder takes.
const MANIFESTS: [&str; 3] = [
    "deploy/kubernetes/configmap.yaml",
    "deploy/kubernetes/deployment.yaml",
    "deploy/kubernetes/service.yaml",
];

/// Where the ConfigMap is mounted and what its TOML key is called.
const CONFIG_DIR: &str = "/etc/wasm-echo";
const CONFIG_KEY: &str = "wasm-echo.toml";

/// How long past drain-delay + grace the server may take to exit (the
/// README's "If anything still runs 5 s after the drain delay and grace
/// period, the server exits anyway").
const SHUTDOWN_OVERRUN: u64 = 5;

/// A program of the project's venv, or a one-line failure saying how to
/// get it.
fn venv_program(name: &str) -> PathBuf {
    let path = repo_file("target/venv/bin").join(name);
    assert!(
        path.is_file(),
        "{} is missing: scripts/bootstrap.sh installs kubernetes-validate into target/venv; \
         WASM_ECHO_SKIP_TESTS=kubernetes skips these tests",
        path.display()
    );
    path
}

/// Runs `program ARGS`, bounded in time by `timeout` (coreutils).
fn bounded(program: &PathBuf, args: &[String]) -> Output {
    Command::new("timeout")
        .arg("60")
        .arg(program)
        .args(args)
        .output()
        .expect("timeout runs")
}

/// `kubernetes-validate --strict` (unknown keys are errors) of `files`
/// against Kubernetes `version`.
fn validate(files: &[PathBuf], version: &str) -> Output {
    let mut args = vec!["--strict".to_owned(), "-k".to_owned(), version.to_owned()];
    args.extend(files.iter().map(|file| file.display().to_string()));
    bounded(&venv_program("kubernetes-validate"), &args)
}

/// Every resource in the manifests, as JSON (PyYAML, which
/// kubernetes-validate brings, reads the YAML).
fn resources() -> Vec<Value> {
    let mut args = vec![
        "-c".to_owned(),
        "import json, sys, yaml\n\
         json.dump([doc for name in sys.argv[1:] for doc in yaml.safe_load_all(open(name))], sys.stdout)"
            .to_owned(),
    ];
    args.extend(
        MANIFESTS
            .iter()
            .map(|file| repo_file(file).display().to_string()),
    );
    let output = bounded(&venv_program("python"), &args);
    serde_json::from_str(&succeeded("reading the manifests", &output))
        .expect("JSON from the manifests")
}

/// The resource of `kind` (there is one of each).
fn of_kind<'a>(resources: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<_> = resources.iter().filter(|r| r["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "one {kind} in the manifests");
    found[0]
}

/// The TOML the ConfigMap carries.
fn configured_toml(resources: &[Value]) -> String {
    of_kind(resources, "ConfigMap")["data"][CONFIG_KEY]
        .as_str()
        .unwrap_or_else(|| panic!("the ConfigMap has no {CONFIG_KEY}"))
        .to_owned()
}

#[test]
#[cfg_attr(skip_kubernetes, ignore = "WASM_ECHO_SKIP_TESTS names kubernetes")]
fn manifests_validate_against_the_kubernetes_schemas() {
    let files: Vec<PathBuf> = MANIFESTS.iter().map(|file| repo_file(file)).collect();
    // The oldest release with the kubelet's sleep action (the preStop hook)
    // on by default, and the newest the validator knows.
    for version in ["1.30.0", "1.37.0"] {
        let output = validate(&files, version);
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "Kubernetes {version}: {stdout}{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(stdout.matches("passed").count(), files.len(), "{stdout}");
    }

    // The validator does look: one misspelt key in a copy of the Deployment
    // is refused, by name.
    let deployment = std::fs::read_to_string(&files[1]).expect("deployment.yaml");
    assert!(deployment.contains("failureThreshold: 3"));
    let broken = scratch_file(
        "deployment.yaml",
        deployment
            .replacen("failureThreshold: 3", "failureThreshhold: 3", 1)
            .as_bytes(),
    );
    let output = validate(&[broken], "1.37.0");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!output.status.success(), "{stdout}");
    assert!(stdout.contains("failureThreshhold"), "{stdout}");
}

#[test]
#[cfg_attr(skip_kubernetes, ignore = "WASM_ECHO_SKIP_TESTS names kubernetes")]
fn the_configmap_holds_a_configuration_that_checks() {
    let toml = configured_toml(&resources());
    let path = scratch_file(CONFIG_KEY, toml.as_bytes());
    let output = run(&["check", "--config", path.to_str().expect("utf-8 path")]);
    let stdout = succeeded("check --config", &output);
    for line in [
        "greeter: built-in plugin `hello` on udp 0.0.0.0:12345, tcp 0.0.0.0:12345",
        "mirror: built-in plugin `echo` on udp 0.0.0.0:12346, tcp 0.0.0.0:12346",
    ] {
        assert!(stdout.contains(line), "{stdout}");
    }
}

/// A duration key of the server's configuration (`drain-delay`, `grace`).
fn seconds(config: &toml::Table, key: &str) -> u64 {
    let text = config[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} is set"));
    humantime::parse_duration(text)
        .unwrap_or_else(|error| panic!("{key}: {error}"))
        .as_secs()
}

/// A whole number in a manifest.
fn number(value: &Value) -> u64 {
    value
        .as_u64()
        .unwrap_or_else(|| panic!("not a number: {value}"))
}

#[test]
#[cfg_attr(skip_kubernetes, ignore = "WASM_ECHO_SKIP_TESTS names kubernetes")]
fn the_deployment_the_service_and_the_configuration_agree() {
    let resources = resources();
    let config: toml::Table = configured_toml(&resources)
        .parse()
        .expect("the ConfigMap's TOML parses");
    let config_map = of_kind(&resources, "ConfigMap");
    let deployment = of_kind(&resources, "Deployment");
    let service = of_kind(&resources, "Service");
    let pod = &deployment["spec"]["template"];
    let container = &pod["spec"]["containers"][0];

    // The pods are the Deployment's and the Service's.
    let labels = &pod["metadata"]["labels"];
    for selector in [
        &deployment["spec"]["selector"]["matchLabels"],
        &service["spec"]["selector"],
    ] {
        for (key, value) in selector.as_object().expect("a selector") {
            assert_eq!(&labels[key], value, "selector {key}");
        }
    }

    // The server reads the ConfigMap's TOML where it is mounted.
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|arg| arg.as_str().expect("a string"))
        .collect();
    let after = |flag: &str| {
        let at = args.iter().position(|arg| *arg == flag);
        at.and_then(|at| args.get(at + 1).copied())
            .unwrap_or_else(|| panic!("{flag} in {args:?}"))
    };
    assert_eq!(args[0], "serve");
    assert_eq!(after("--config"), format!("{CONFIG_DIR}/{CONFIG_KEY}"));
    let mount = container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|mount| mount["mountPath"] == CONFIG_DIR)
        .expect("the configuration is mounted");
    let volume = pod["spec"]["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|volume| volume["name"] == mount["name"])
        .expect("the mounted volume");
    assert_eq!(volume["configMap"]["name"], config_map["metadata"]["name"]);

    // Every listener's port is a container port and a Service port, with
    // its protocol; the Service's target ports name container ports.
    let container_ports = container["ports"].as_array().expect("ports");
    let named_port = |name: &Value| {
        container_ports
            .iter()
            .find(|port| &port["name"] == name)
            .unwrap_or_else(|| panic!("no container port named {name}"))
    };
    let service_ports = service["spec"]["ports"].as_array().expect("ports");
    for (name, listener) in config["listeners"].as_table().expect("listeners") {
        for protocol in ["udp", "tcp"] {
            let Some(addr) = listener.get(protocol) else {
                continue;
            };
            let addr: std::net::SocketAddr = addr
                .as_str()
                .and_then(|addr| addr.parse().ok())
                .unwrap_or_else(|| panic!("listeners.{name}.{protocol}"));
            let upper = protocol.to_uppercase();
            let target = service_ports
                .iter()
                .find(|port| {
                    port["protocol"] == upper && number(&port["port"]) == u64::from(addr.port())
                })
                .unwrap_or_else(|| {
                    panic!("the Service lacks {name}'s {upper} port {}", addr.port())
                })["targetPort"]
                .clone();
            let port = named_port(&target);
            assert_eq!(
                number(&port["containerPort"]),
                u64::from(addr.port()),
                "{name} {upper}"
            );
            assert_eq!(port["protocol"], upper, "{name} {upper}");
        }
    }
    // UDP affinity by client address: a UDP plugin's state is per pod.
    assert_eq!(service["spec"]["sessionAffinity"], "ClientIP");

    // The probes ask the admin endpoint, on the port --metrics binds.
    let metrics: std::net::SocketAddr = after("--metrics").parse().expect("--metrics ADDR");
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(
            number(&named_port(&get["port"])["containerPort"]),
            u64::from(metrics.port()),
            "{probe}"
        );
    }

    // Shutdown timing (deployment.yaml says why): readiness fails within
    // the drain delay, and the kubelet waits out the preStop sleep, the
    // drain delay, the grace period and the server's last 5 s.
    let drain_delay = seconds(&config, "drain-delay");
    let grace = seconds(&config, "grace");
    let readiness = &container["readinessProbe"];
    assert!(
        number(&readiness["periodSeconds"]) * number(&readiness["failureThreshold"]) < drain_delay,
        "a balancer probing /readyz must see the drain before the listeners stop"
    );
    let pre_stop = number(&container["lifecycle"]["preStop"]["sleep"]["seconds"]);
    let termination = number(&pod["spec"]["terminationGracePeriodSeconds"]);
    let needed = Duration::from_secs(pre_stop + drain_delay + grace + SHUTDOWN_OVERRUN);
    assert!(
        Duration::from_secs(termination) > needed,
        "terminationGracePeriodSeconds {termination} must exceed {needed:?} \
         (preStop {pre_stop} + drain-delay {drain_delay} + grace {grace} + {SHUTDOWN_OVERRUN})"
    );
}
