//! What deploy/ ships, checked offline: the Kubernetes overlays (deploy/check.sh:
//! kustomize, kubernetes-validate --strict, yamllint, checksums), the Dockerfiles
//! (hadolint, COPY sources), the image's build steps run without Docker
//! (deploy/image.sh), and the probes against what the daemon really serves.
//! The tools come from deploy/tools.sh; without them these tests fail and say so.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use likeness::grpc::pb;
use likeness::grpc::pb::models_client::ModelsClient;

use crate::common::{channel, health_addr, spawn_command, wait_for_service};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs deploy/check.sh with `args`; a missing tool fails the test with the fix.
fn check_sh(args: &[&str]) -> Output {
    let out = Command::new("bash")
        .arg(root().join("deploy/check.sh"))
        .args(args)
        .output()
        .expect("running deploy/check.sh");
    if out.status.code() == Some(3) {
        panic!(
            "deploy/check.sh lacks a tool; run deploy/tools.sh once (CI's .ci/run does):\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Replaces `from` (which must be there) with `to` in the file at `path`.
fn edit(path: &Path, from: &str, to: &str) {
    let old = std::fs::read_to_string(path).unwrap();
    assert!(old.contains(from), "{} lacks {from:?}", path.display());
    std::fs::write(path, old.replacen(from, to, 1)).unwrap();
}

#[test]
fn overlays_and_dockerfiles_pass_the_offline_checks() {
    let out = check_sh(&[]);
    let all = text(&out);
    assert!(out.status.success(), "deploy/check.sh failed:\n{all}");
    for overlay in ["cpu", "gpu"] {
        assert!(
            all.contains(&format!("overlay {overlay}: rendered, valid")),
            "{all}"
        );
    }
}

/// Each guard of check.sh, broken once in a copy: the check must fail and say where.
#[test]
fn a_broken_manifest_or_dockerfile_fails_the_check() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, &str, &str, &str); 4] = [
        // A field Kubernetes does not know (strict validation).
        (
            "base/index.yaml",
            "  podManagementPolicy: Parallel\n",
            "  podManagementPolicy: Parallel\n  replica: 2\n",
            "'replica' was unexpected",
        ),
        // A value of the wrong type.
        (
            "base/embed.yaml",
            "  replicas: 2\n",
            "  replicas: two\n",
            "did not validate",
        ),
        // A config change without its checksum: the annotation is stale.
        (
            "base/likeness.toml",
            "cache_mb = 32",
            "cache_mb = 64",
            "checksum/config is",
        ),
        // An overlay that patches a path the base does not have.
        (
            "overlays/gpu/gpu.yaml",
            "/spec/template/spec/containers/0/resources/requests/memory",
            "/spec/template/spec/containers/0/resourcez/requests/memory",
            "does not render",
        ),
    ];
    for (i, (file, from, to, says)) in cases.into_iter().enumerate() {
        let copy = tmp.path().join(format!("k8s-{i}"));
        copy_dir(&root().join("deploy/k8s"), &copy);
        edit(&copy.join(file), from, to);
        let out = check_sh(&["k8s", copy.to_str().unwrap()]);
        let all = text(&out);
        assert_eq!(out.status.code(), Some(1), "{file}: {to:?} passed:\n{all}");
        assert!(
            all.contains(says),
            "{file}: {to:?} did not say {says:?}:\n{all}"
        );
    }
    // yamllint: a lint error alone fails the check too.
    let copy = tmp.path().join("k8s-lint");
    copy_dir(&root().join("deploy/k8s"), &copy);
    edit(
        &copy.join("base/networkpolicy.yaml"),
        "  name: likeness\n",
        "  name: likeness   \n",
    );
    let out = check_sh(&["k8s", copy.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("trailing-spaces"), "{}", text(&out));

    // hadolint: a floating base image tag.
    let dockerfile = tmp.path().join("Dockerfile");
    std::fs::copy(root().join("deploy/Dockerfile"), &dockerfile).unwrap();
    edit(
        &dockerfile,
        "ARG RUNTIME_IMAGE=debian:bookworm-slim\n",
        "ARG RUNTIME_IMAGE=debian:bookworm-slim\nFROM debian:latest AS extra\n",
    );
    let out = check_sh(&["docker", dockerfile.to_str().unwrap()]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("DL3007"), "{}", text(&out));
}

/// A rendered overlay: the objects as JSON.
fn render(overlay: &str) -> Vec<serde_json::Value> {
    let out = check_sh(&["render", overlay]);
    assert!(out.status.success(), "render {overlay}: {}", text(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Every probe of every workload in every overlay, asked of a daemon started with that
/// workload's arguments and config: readiness and startup name a likeness service (not
/// the empty name, which is SERVING before recovery), on the port the config gives
/// health, and the daemon reports it SERVING.
#[tokio::test]
async fn probes_name_services_the_daemon_serves_on_its_health_port() {
    for overlay in ["cpu", "gpu"] {
        let objects = render(overlay);
        let config_map = objects
            .iter()
            .find(|o| o["kind"] == "ConfigMap")
            .expect("a ConfigMap");
        let toml_text = config_map["data"]["likeness.toml"].as_str().unwrap();
        let config: toml::Table = toml::from_str(toml_text).unwrap();
        let port_of = |key: &str| -> i64 {
            let addr: std::net::SocketAddr = config[key].as_str().unwrap().parse().unwrap();
            i64::from(addr.port())
        };
        let (grpc_port, health_port) = (port_of("listen"), port_of("health_listen"));
        let grace = config["shutdown_grace_secs"].as_integer().unwrap();
        let mut workloads = 0;
        for o in &objects {
            if o["kind"] != "StatefulSet" && o["kind"] != "Deployment" {
                continue;
            }
            workloads += 1;
            let name = format!("{overlay}/{}", o["metadata"]["name"].as_str().unwrap());
            let pod = &o["spec"]["template"]["spec"];
            let container = &pod["containers"][0];
            let stop_budget = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
            let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
                .as_i64()
                .unwrap_or(0);
            assert!(
                stop_budget > grace + pre_stop,
                "{name}: terminationGracePeriodSeconds {stop_budget} <= shutdown grace {grace} + preStop {pre_stop}"
            );
            let ports: BTreeMap<&str, i64> = container["ports"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    (
                        p["name"].as_str().unwrap(),
                        p["containerPort"].as_i64().unwrap(),
                    )
                })
                .collect();
            assert_eq!(ports.get("grpc"), Some(&grpc_port), "{name}");
            assert_eq!(ports.get("health"), Some(&health_port), "{name}");

            // The workload's own arguments, with the config from the rendered ConfigMap.
            // Not the device: `--device cuda` needs a GPU, and the probes do not care.
            let tmp = tempfile::tempdir().unwrap();
            let config_path = tmp.path().join("likeness.toml");
            std::fs::write(&config_path, toml_text).unwrap();
            let mut args: Vec<String> = container["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap().to_string())
                .collect();
            if let Some(i) = args.iter().position(|a| a == "--device") {
                args.drain(i..i + 2);
            }
            let config_arg = args.iter().position(|a| a == "--config").unwrap() + 1;
            args[config_arg] = config_path.to_str().unwrap().into();
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_likeness"));
            cmd.arg("serve")
                .args(&args)
                .args(["--listen", "127.0.0.1:0", "--health-listen", "127.0.0.1:0"])
                .arg("--data-dir")
                .arg(tmp.path().join("data"));
            let daemon = spawn_command(cmd);
            let main_url = format!("http://{}", daemon.addr);
            let health_url = format!("http://{}", health_addr(&daemon));

            for kind in ["startupProbe", "readinessProbe", "livenessProbe"] {
                let probe = &container[kind]["grpc"];
                assert!(probe.is_object(), "{name}: {kind} is not a gRPC probe");
                let port = probe["port"].as_i64().unwrap();
                let url = if port == health_port {
                    &health_url
                } else if port == grpc_port {
                    &main_url
                } else {
                    panic!("{name}: {kind} probes port {port}, which the daemon does not serve")
                };
                let service = probe["service"].as_str().unwrap_or("");
                if kind != "livenessProbe" {
                    assert!(
                        service.starts_with("likeness.v1."),
                        "{name}: {kind} must name a likeness service, not {service:?}"
                    );
                }
                wait_for_service(url, service).await;
            }
        }
        assert_eq!(workloads, 2, "{overlay}: an index and an embed workload");
    }
}

/// A Dockerfile as instructions: continuation lines joined, comments dropped.
fn instructions(path: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(path).unwrap();
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let line = line.trim();
        if current.is_empty() && (line.is_empty() || line.starts_with('#')) {
            continue;
        }
        if let Some(head) = line.strip_suffix('\\') {
            current.push_str(head);
            current.push(' ');
            continue;
        }
        current.push_str(line);
        let (op, rest) = current.split_once(' ').unwrap();
        out.push((op.to_uppercase(), rest.trim().to_string()));
        current.clear();
    }
    out
}

/// The Dockerfiles' COPY sources from the build context exist, and .dockerignore lets
/// them through; `image.sh stubs` satisfies every target Cargo.toml declares.
#[test]
fn dockerfile_copy_sources_are_in_the_build_context() {
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    let allowed: Vec<&str> = ignore
        .lines()
        .filter_map(|l| l.trim().strip_prefix('!'))
        .collect();
    assert!(
        ignore.lines().any(|l| l.trim() == "*"),
        ".dockerignore starts from nothing"
    );
    for file in ["deploy/Dockerfile", "deploy/Dockerfile.cuda"] {
        let mut copies = 0;
        for (op, rest) in instructions(&root().join(file)) {
            if op != "COPY" || rest.starts_with("--from") {
                continue;
            }
            let words: Vec<&str> = rest.split_whitespace().collect();
            for source in &words[..words.len() - 1] {
                copies += 1;
                assert!(
                    root().join(source).exists(),
                    "{file}: COPY {source}: no such path"
                );
                assert!(
                    allowed
                        .iter()
                        .any(|a| source == a || source.starts_with(&format!("{a}/"))),
                    "{file}: COPY {source} is excluded by .dockerignore"
                );
            }
        }
        assert!(copies >= 5, "{file}: only {copies} COPY sources found");
    }

    // The dependency layer builds against stubs, so they must give every target that
    // Cargo.toml declares a file (cargo only notices a missing one when it compiles).
    let tmp = tempfile::tempdir().unwrap();
    let stubs = Command::new("bash")
        .arg(root().join("deploy/image.sh"))
        .args(["stubs", tmp.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(stubs.status.success(), "{}", text(&stubs));
    let manifest: toml::Table =
        toml::from_str(&std::fs::read_to_string(root().join("Cargo.toml")).unwrap()).unwrap();
    let mut targets = vec![manifest["lib"]["path"].as_str().unwrap()];
    targets.extend(
        manifest["bin"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["path"].as_str().unwrap()),
    );
    for target in targets {
        assert!(
            tmp.path().join(target).is_file(),
            "image.sh stubs leaves no {target}"
        );
    }
}

/// The CPU image's layout, staged by the image's own steps (deploy/image.sh: ONNX
/// Runtime from the wheel, the shipped models) under a temp root, then the daemon run
/// with the final stage's ENV and ENTRYPOINT (paths moved under that root, the port to
/// 127.0.0.1:0): it loads both models from there, and its store serves.
#[tokio::test]
async fn image_steps_stage_a_layout_the_daemon_runs_from() {
    let dockerfile = instructions(&root().join("deploy/Dockerfile"));
    let last_from = dockerfile.iter().rposition(|(op, _)| op == "FROM").unwrap();
    let final_stage = &dockerfile[last_from..];
    let tmp = tempfile::tempdir().unwrap();
    let stage = tmp.path().to_str().unwrap().to_string();
    let moved = |value: &str| match value {
        "/data" => format!("{stage}/data"),
        "/src" => root().to_str().unwrap().to_string(),
        _ => value.replace("/opt/likeness", &format!("{stage}/opt/likeness")),
    };
    // The RUN steps of the stages the final one copies from, as the Dockerfile has them.
    for (op, rest) in &dockerfile {
        if op != "RUN" || !rest.starts_with("image.sh ort") && !rest.starts_with("image.sh models")
        {
            continue;
        }
        let words: Vec<String> = rest.split_whitespace().map(moved).collect();
        let out = Command::new("bash")
            .arg(root().join("deploy/image.sh"))
            .args(&words[1..])
            .output()
            .unwrap();
        assert!(out.status.success(), "{rest}: {}", text(&out));
    }

    let mut envs: Vec<(String, String)> = Vec::new();
    let mut entrypoint: Vec<String> = Vec::new();
    let mut user = String::new();
    let mut volumes = String::new();
    for (op, rest) in final_stage {
        match op.as_str() {
            "ENV" => envs.extend(rest.split_whitespace().map(|kv| {
                let (k, v) = kv.split_once('=').unwrap();
                (k.to_string(), moved(v))
            })),
            "ENTRYPOINT" => entrypoint = serde_json::from_str(rest).unwrap(),
            "USER" => user = rest.clone(),
            "VOLUME" => volumes = rest.clone(),
            _ => {}
        }
    }
    assert!(
        !user.is_empty() && !user.starts_with("0") && !user.starts_with("root"),
        "USER {user}"
    );
    let data_dir = envs.iter().find(|(k, _)| k == "LIKENESS_DATA_DIR").unwrap();
    assert_eq!(volumes, r#"["/data"]"#, "the data dir is the volume");
    assert_eq!(data_dir.1, format!("{stage}/data"));
    assert_eq!(&entrypoint[..2], ["likeness", "serve"]);
    let listen = entrypoint.iter().position(|a| a == "--listen").unwrap() + 1;
    assert_eq!(entrypoint[listen], "0.0.0.0:50051");
    entrypoint[listen] = "127.0.0.1:0".into();

    let mut cmd = Command::new(env!("CARGO_BIN_EXE_likeness"));
    cmd.args(&entrypoint[1..])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(envs.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let daemon = spawn_command(cmd);
    let url = format!("http://{}", daemon.addr);
    wait_for_service(&url, "likeness.v1.Items").await;
    let models = ModelsClient::new(channel(&url).await)
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    let mut names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["fmnist-pair", "fmnist-triplet"]);
    assert!(
        std::fs::read_dir(&data_dir.1).unwrap().next().is_some(),
        "no store in the data dir"
    );
    // ONNX Runtime came from the staged library, not the one the build compiled in.
    let ort = envs
        .iter()
        .find(|(k, _)| k == "LIKENESS_ORT_DYLIB")
        .unwrap();
    let log = daemon.log.lock().unwrap().join("\n");
    assert!(
        log.contains(&format!("\"library\":\"{}\"", ort.1)),
        "not loaded from {}:\n{log}",
        ort.1
    );
}
