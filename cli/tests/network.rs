//! `fedtune server` and `fedtune client` as separate processes on loopback QUIC with the real
//! SmolLM2 model: an operator issues a token, starts the daemon, two devices enroll and train
//! two FedKSeed rounds on their own text, the daemon stops cleanly on SIGTERM.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn fedtune() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fedtune"))
}

#[test]
fn daemon_and_devices_as_processes_on_smollm2() {
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !model.is_file() {
        eprintln!("SKIPPED: needs {}", model.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:{port}\"\nstate_dir = \"state\"\nmodel = \"{}\"\n\
             [rounds]\ntotal_rounds = 2\nclients_per_round = 2\nover_selection = 1.0\nmin_reports = 2\n\
             [algorithm]\nname = \"fedkseed\"\n[algorithm.run]\nk = 64\ntau = 2\nlr = 1e-6\neps = 1e-3\n",
            model.display()
        ),
    )
    .unwrap();

    let token = fedtune()
        .args(["server", "--config"])
        .arg(&config)
        .args(["token", "--uses", "2"])
        .output()
        .unwrap();
    assert!(
        token.status.success(),
        "{}",
        String::from_utf8_lossy(&token.stderr)
    );
    let token = String::from_utf8(token.stdout).unwrap().trim().to_string();
    assert_eq!(token.len(), 32);

    let mut daemon = fedtune()
        .args(["server", "--config"])
        .arg(&config)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let identity = dir.path().join("state/server-identity.json");
    let start = Instant::now();
    while !identity.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the daemon did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let texts = [
        "But, soft! what light through yonder window breaks? It is the east, and Juliet is the sun.",
        "O Romeo, Romeo! wherefore art thou Romeo? Deny thy father and refuse thy name.",
    ];
    let devices: Vec<_> = texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let data = dir.path().join(format!("text{i}.txt"));
            std::fs::write(&data, text).unwrap();
            fedtune()
                .args(["client", "--model"])
                .arg(&model)
                .arg("--server")
                .arg(&identity)
                .arg("--data")
                .arg(&data)
                .args(["--seq-len", "16", "--token", &token, "--state"])
                .arg(dir.path().join(format!("device{i}")))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for device in devices {
        let out = device.wait_with_output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("enrolled as "), "{stdout}");
        assert!(stdout.contains("round 2: report accepted"), "{stdout}");
        assert!(stdout.contains("run finished after round 2"), "{stdout}");
    }

    let _ = Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = daemon.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the daemon ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "daemon exit: {status}");
    // Both rounds' checkpoints are on disk (FedKSeed history), the newest being round 2.
    let checkpoints: Vec<_> = std::fs::read_dir(dir.path().join("state/store/checkpoints"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect();
    assert!(
        checkpoints.iter().any(|n| n.contains("00000002")),
        "{checkpoints:?}"
    );
}
