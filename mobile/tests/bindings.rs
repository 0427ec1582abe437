//! The SDK as apps see it: the generated bindings, driven from their own languages against a
//! real `fedtune-server` on loopback with a tiny model.
//!
//! - Python (the whole acceptance path: enroll, policy refusal, plan, training, report,
//!   progress events, pause and resume, stop, typed errors);
//! - Kotlin (compiled with kotlinc and run on the JVM through JNA against the host library;
//!   skipped with `SKIPPED:` where kotlinc or JNA is missing, unless
//!   `FEDTUNE_REQUIRE_KOTLIN=1`);
//! - the checked-in Kotlin and Swift sources, which must equal freshly generated ones
//!   (`FEDTUNE_UPDATE_BINDINGS=1` rewrites them).
//!
//! All three generate from the cdylib `cargo test` builds beside this test binary, so they
//! exercise exactly the library under test.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fedtune_tests::network::*;
use serde_json::json;
use uniffi::{GenerateOptions, TargetLanguage};

/// The crate's directory.
fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The host cdylib cargo built for this test run. `cargo test` builds it beside the test binary
/// (`target/debug/deps/`) without copying it up to `target/debug/`, where `cargo build` puts it.
fn library() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let deps = exe.parent().expect("target/<profile>/deps");
    let name = format!(
        "{}fedtune_mobile{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    [deps, deps.parent().unwrap_or(deps)]
        .iter()
        .map(|dir| dir.join(&name))
        .find(|path| path.exists())
        .unwrap_or_else(|| panic!("{name} was not built beside {}", exe.display()))
}

/// Generates `language`'s bindings into `out`, the way the README's command does.
fn generate(language: TargetLanguage, out: &Path) {
    let utf8 = |p: &Path| p.to_str().expect("UTF-8 path").to_string();
    uniffi::generate(GenerateOptions {
        languages: vec![language],
        source: utf8(&library()).into(),
        out_dir: utf8(out).into(),
        crate_filter: Some("fedtune_mobile".into()),
        ..GenerateOptions::default()
    })
    .expect("generate bindings");
}

/// A character-level tokenizer over the tiny model's 64 ids, so apps' text examples can be
/// tokenized like a real model's (ChatML's markers are spelled with these characters too).
fn write_tiny_tokenizer(model: &Path) {
    let chars = "abcdefghijklmnopqrstuvwxyz .,!?'\n<>|_0123456789ABCDEFGHIJKLMNOPQ";
    let vocab: serde_json::Map<String, serde_json::Value> = chars
        .chars()
        .enumerate()
        .map(|(i, c)| (c.to_string(), json!(i)))
        .collect();
    assert_eq!(vocab.len(), 64);
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": null,
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": "?",
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "vocab": vocab,
            "merges": []
        }
    });
    std::fs::write(model.join("tokenizer.json"), tokenizer.to_string()).expect("tokenizer");
}

/// A tiny model folder with a tokenizer, as an app would ship it.
fn tiny_app_model(dir: &Path) -> PathBuf {
    let model = tiny_model_folder(dir, 11);
    write_tiny_tokenizer(&model);
    model
}

/// Runs a command, printing its output (shown with `--nocapture` or on failure).
fn run(command: &mut Command) -> Output {
    let output = command.output().expect("start process");
    println!("{}", String::from_utf8_lossy(&output.stdout));
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    output
}

/// What a script needs to reach the server and the model.
fn script_arguments(server: &TestServer, model: &Path, dir: &Path) -> String {
    let identity = server.identity();
    json!({
        "address": identity.address.to_string(),
        "certificate_pem": identity.certificate_pem,
        "signing_key": identity.signing_key,
        "token": TOKEN,
        "model": model,
        "data_dir": dir.join("phone"),
        "other_data_dir": dir.join("other-phone"),
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_app_enrolls_trains_pauses_and_stops_against_a_real_server() {
    let dir = tempfile::tempdir().unwrap();
    let bindings = dir.path().join("python");
    generate(TargetLanguage::Python, &bindings);
    // The Python module loads the library from its own folder.
    let library = library();
    std::fs::copy(&library, bindings.join(library.file_name().unwrap())).unwrap();

    let model = tiny_app_model(dir.path());
    // Enough rounds that the run is still going when the script stops it.
    let server = TestServer::start(server_config(&dir.path().join("server"), &model, 1, 50));
    let arguments = script_arguments(&server, &model, dir.path());
    let script = crate_dir().join("tests/python/sdk_test.py");
    let output = tokio::task::spawn_blocking(move || {
        run(Command::new("python3")
            .arg(script)
            .arg(arguments)
            .env("PYTHONPATH", &bindings))
    })
    .await
    .unwrap();
    assert!(output.status.success(), "the Python app failed");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("python app: all checks passed"), "{stdout}");
    // The server counted the device's reports: training really happened over the network.
    assert!(server.core.store().report_count(1).unwrap() >= 1);
    assert!(server.core.round().0 >= 2, "round 2 never opened");
    server.stop().await;
}

/// `kotlinc` and the JNA jar, or why the Kotlin test cannot run.
fn kotlin_tools() -> Result<(PathBuf, PathBuf), String> {
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let kotlinc = std::env::var_os("KOTLINC")
        .map(PathBuf::from)
        .or_else(|| {
            let installed =
                home.join(".cache/fedtune/kotlin/node_modules/kotlin-compiler/bin/kotlinc");
            installed.exists().then_some(installed)
        })
        .or_else(|| {
            Command::new("kotlinc")
                .arg("-version")
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|_| PathBuf::from("kotlinc"))
        })
        .ok_or("no kotlinc (scripts/test installs it with npm)")?;
    let jna = std::env::var_os("JNA_JAR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/share/java/jna.jar"));
    if !jna.exists() {
        return Err(format!(
            "no JNA at {} (Debian's libjna-java)",
            jna.display()
        ));
    }
    Ok((kotlinc, jna))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kotlin_app_compiles_and_enrolls_against_a_real_server() {
    let (kotlinc, jna) = match kotlin_tools() {
        Ok(tools) => tools,
        Err(why) if std::env::var("FEDTUNE_REQUIRE_KOTLIN").is_ok_and(|v| v == "1") => {
            panic!("FEDTUNE_REQUIRE_KOTLIN=1 but {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_app_model(dir.path());
    let server = TestServer::start(server_config(&dir.path().join("server"), &model, 1, 50));
    let identity = server.identity();
    let arguments = [
        identity.address.to_string(),
        identity.certificate_pem,
        identity.signing_key,
        TOKEN.to_string(),
        model.display().to_string(),
        dir.path().join("phone").display().to_string(),
    ];
    let sources = crate_dir().join("bindings/kotlin/uniffi/fedtune_mobile/fedtune_mobile.kt");
    let main = crate_dir().join("tests/kotlin/Main.kt");
    let jar = dir.path().join("smoke.jar");
    let library_dir = library().parent().unwrap().to_path_buf();
    let output = tokio::task::spawn_blocking(move || {
        // One kotlinc run for the bindings and the app (the compiler's start-up dominates).
        let started = std::time::Instant::now();
        let compiled = run(Command::new(&kotlinc)
            .arg(&sources)
            .arg(&main)
            .arg("-classpath")
            .arg(&jna)
            .arg("-nowarn")
            .arg("-include-runtime")
            .arg("-d")
            .arg(&jar));
        assert!(compiled.status.success(), "kotlinc failed");
        println!("kotlinc took {:.1} s", started.elapsed().as_secs_f64());
        run(Command::new("java")
            .arg(format!("-Djna.library.path={}", library_dir.display()))
            .arg("-classpath")
            .arg(format!("{}:{}", jar.display(), jna.display()))
            .arg("MainKt")
            .args(arguments))
    })
    .await
    .unwrap();
    assert!(output.status.success(), "the Kotlin app failed");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("kotlin app: all checks passed"), "{stdout}");
    server.stop().await;
}

/// The checked-in sources (what app developers copy, and what the example apps and the
/// Kotlin test compile against) never drift from the library.
#[test]
fn checked_in_kotlin_and_swift_bindings_are_current() {
    let dir = tempfile::tempdir().unwrap();
    for (language, folder) in [
        (TargetLanguage::Kotlin, "kotlin"),
        (TargetLanguage::Swift, "swift"),
    ] {
        let fresh = dir.path().join(folder);
        generate(language, &fresh);
        let checked_in = crate_dir().join("bindings").join(folder);
        let update = std::env::var("FEDTUNE_UPDATE_BINDINGS").is_ok_and(|v| v == "1");
        for file in files_under(&fresh) {
            let relative = file.strip_prefix(&fresh).unwrap();
            let target = checked_in.join(relative);
            let generated = std::fs::read_to_string(&file).unwrap();
            if update {
                std::fs::create_dir_all(target.parent().unwrap()).unwrap();
                std::fs::write(&target, &generated).unwrap();
                continue;
            }
            let held = std::fs::read_to_string(&target).unwrap_or_default();
            assert!(
                held == generated,
                "{} is stale: regenerate with FEDTUNE_UPDATE_BINDINGS=1 cargo test -p fedtune-mobile \
                 --test bindings -- checked_in (see mobile/README.md)",
                target.display()
            );
        }
    }
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else {
            files.push(path);
        }
    }
    files.sort();
    files
}
