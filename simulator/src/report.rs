//! A run folder's files and the markdown report comparing runs.
//!
//! [`RunWriter`] writes a run as it goes (`metrics.jsonl` and `metrics.csv` a line per round,
//! flushed each round so a killed run keeps what it did; `summary.json` at the end);
//! [`read_run`] reads a folder back; [`report`] compares folders in one markdown table.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::record::{RoundRecord, RunSummary, files};

/// Why a run folder could not be written or read, or a report made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReportError {
    /// A file or folder could not be created, written or read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A JSON file or line does not hold what it should.
    #[error("{}{}: {source}", path.display(), line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Json {
        /// The file.
        path: PathBuf,
        /// The 1-based line, for `metrics.jsonl`.
        line: Option<usize>,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// A run folder has no round records.
    #[error("{}: no rounds recorded", path.display())]
    NoRounds {
        /// The `metrics.jsonl` file.
        path: PathBuf,
    },
    /// No run folders were given.
    #[error("no runs to report")]
    NoRuns,
}

/// The CSV columns, in order; the same names as [`RoundRecord`]'s fields.
const CSV_HEADER: &str = "run,algorithm,round,clients,dropped,train_loss,heldout_loss,perplexity,\
rouge_l,round_time_s,sim_time_s,bytes_up,bytes_down,total_bytes,host_wall_s,compute_s,eval_s,peak_rss_bytes,attackers,\
epsilon,secagg_up_bytes_per_client,secagg_down_bytes_per_client,secagg_server_s,dp_server_s";

/// Writes a run folder as the run goes.
#[derive(Debug)]
pub struct RunWriter {
    dir: PathBuf,
    jsonl: BufWriter<File>,
    csv: BufWriter<File>,
}

impl RunWriter {
    /// Creates `dir` (and its parents) and empty `metrics.jsonl` and `metrics.csv` (header
    /// only) in it, replacing earlier ones.
    pub fn create(dir: &Path) -> Result<Self, ReportError> {
        std::fs::create_dir_all(dir).map_err(|source| io(dir, source))?;
        let open = |name: &str| {
            let path = dir.join(name);
            File::create(&path)
                .map(BufWriter::new)
                .map_err(|source| io(&path, source))
        };
        let jsonl = open(files::METRICS_JSONL)?;
        let mut csv = open(files::METRICS_CSV)?;
        writeln!(csv, "{CSV_HEADER}")
            .map_err(|source| io(&dir.join(files::METRICS_CSV), source))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            jsonl,
            csv,
        })
    }

    /// The run folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends one round to both metrics files and flushes them.
    pub fn record(&mut self, record: &RoundRecord) -> Result<(), ReportError> {
        let jsonl_path = self.dir.join(files::METRICS_JSONL);
        let line = serde_json::to_string(record).map_err(|source| ReportError::Json {
            path: jsonl_path.clone(),
            line: None,
            source,
        })?;
        writeln!(self.jsonl, "{line}")
            .and_then(|()| self.jsonl.flush())
            .map_err(|source| io(&jsonl_path, source))?;
        let csv_path = self.dir.join(files::METRICS_CSV);
        writeln!(self.csv, "{}", csv_row(record))
            .and_then(|()| self.csv.flush())
            .map_err(|source| io(&csv_path, source))
    }

    /// Writes `summary.json`, ending the run.
    pub fn finish(self, summary: &RunSummary) -> Result<(), ReportError> {
        let path = self.dir.join(files::SUMMARY_JSON);
        let json = serde_json::to_string_pretty(summary).map_err(|source| ReportError::Json {
            path: path.clone(),
            line: None,
            source,
        })?;
        std::fs::write(&path, json + "\n").map_err(|source| io(&path, source))
    }
}

/// Writes a whole run folder at once: `metrics.jsonl`, `metrics.csv` and `summary.json`.
pub fn write_run(
    dir: &Path,
    records: &[RoundRecord],
    summary: &RunSummary,
) -> Result<(), ReportError> {
    let mut writer = RunWriter::create(dir)?;
    for record in records {
        writer.record(record)?;
    }
    writer.finish(summary)
}

/// A run read back from its folder.
#[derive(Debug, Clone, PartialEq)]
pub struct RunData {
    /// The folder.
    pub dir: PathBuf,
    /// Its rounds, in file order.
    pub records: Vec<RoundRecord>,
    /// Its summary.
    pub summary: RunSummary,
}

/// Reads a run folder's `metrics.jsonl` and `summary.json`. Blank lines are skipped; a run
/// with no rounds is an error.
pub fn read_run(dir: &Path) -> Result<RunData, ReportError> {
    let metrics = dir.join(files::METRICS_JSONL);
    let file = File::open(&metrics).map_err(|source| io(&metrics, source))?;
    let mut records = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|source| io(&metrics, source))?;
        if line.trim().is_empty() {
            continue;
        }
        records.push(
            serde_json::from_str(&line).map_err(|source| ReportError::Json {
                path: metrics.clone(),
                line: Some(i + 1),
                source,
            })?,
        );
    }
    if records.is_empty() {
        return Err(ReportError::NoRounds { path: metrics });
    }
    let summary_path = dir.join(files::SUMMARY_JSON);
    let text =
        std::fs::read_to_string(&summary_path).map_err(|source| io(&summary_path, source))?;
    let summary = serde_json::from_str(&text).map_err(|source| ReportError::Json {
        path: summary_path,
        line: None,
        source,
    })?;
    Ok(RunData {
        dir: dir.to_path_buf(),
        records,
        summary,
    })
}

/// The simulated time at the end of the first evaluated round whose held-out loss is at most
/// `target`, or 0 if the loss before the first round (`initial`) already was.
pub fn time_to_target(initial: f32, records: &[RoundRecord], target: f32) -> Option<f64> {
    if initial <= target {
        return Some(0.0);
    }
    records
        .iter()
        .find(|r| r.heldout_loss.is_some_and(|l| l <= target))
        .map(|r| r.sim_time_s)
}

/// A markdown report comparing the runs in `run_dirs`: one table row per run, then each run's
/// command line.
///
/// The "time to target" column is the simulated time at which a run's held-out loss first
/// reached `target_loss`. Without a target, the target is the highest final held-out loss among
/// the runs: the quality every run reached, so the column says how soon each got there.
pub fn report(run_dirs: &[PathBuf], target_loss: Option<f32>) -> Result<String, ReportError> {
    if run_dirs.is_empty() {
        return Err(ReportError::NoRuns);
    }
    let runs = run_dirs
        .iter()
        .map(|d| read_run(d))
        .collect::<Result<Vec<_>, _>>()?;
    let (target, chosen) = match target_loss {
        Some(t) => (t, "given"),
        None => (
            runs.iter()
                .map(|r| r.summary.final_heldout_loss)
                .fold(f32::NEG_INFINITY, f32::max),
            "the highest final loss among the runs",
        ),
    };
    let any_rouge = runs.iter().any(|r| r.summary.final_rouge_l.is_some());

    let mut out = String::new();
    out.push_str(
        "| run | algorithm | clients | rounds | held-out loss (start → end) | perplexity |",
    );
    if any_rouge {
        out.push_str(" Rouge-L F |");
    }
    out.push_str(&format!(
        " sim. time to loss ≤ {target:.3} | sim. time | up / client / round | down / client / round | total bytes | peak memory | host time |\n"
    ));
    let columns = 13 + usize::from(any_rouge);
    out.push('|');
    for i in 0..columns {
        // Text columns left, numbers right.
        out.push_str(if i < 2 { " --- |" } else { " ---: |" });
    }
    out.push('\n');
    for run in &runs {
        let s = &run.summary;
        let total_bytes = run.records.last().map_or(0, |r| r.total_bytes);
        let reached = time_to_target(s.initial_heldout_loss, &run.records, target)
            .map_or_else(|| "not reached".to_string(), duration);
        let clients = match s.attackers {
            0 => s.clients.to_string(),
            n => format!("{} ({n} attacking)", s.clients),
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {:.3} → {:.3} | {:.2} |",
            cell(&s.run),
            cell(&s.algorithm),
            clients,
            s.rounds,
            s.initial_heldout_loss,
            s.final_heldout_loss,
            s.final_perplexity
        ));
        if any_rouge {
            out.push_str(&format!(
                " {} |",
                s.final_rouge_l
                    .map_or_else(|| "–".to_string(), |v| format!("{v:.4}"))
            ));
        }
        out.push_str(&format!(
            " {} | {} | {} | {} | {} | {} | {} |\n",
            reached,
            duration(s.sim_time_s),
            bytes(s.bytes_up_per_client_round),
            bytes(s.bytes_down_per_client_round),
            bytes(total_bytes as f64),
            s.peak_rss_bytes
                .map_or_else(|| "–".to_string(), |b| bytes(b as f64)),
            duration(s.host_wall_s),
        ));
    }
    out.push_str(&format!(
        "\nTarget held-out loss {target:.3} ({chosen}). Times are simulated wall-clock (device \
         compute scaled by each profile, plus transfers) except host time, the real time the \
         run took here. Bytes are encoded messages; memory is the harness process's peak \
         resident set.\n"
    ));
    let attacked: Vec<&RunData> = runs.iter().filter(|r| r.summary.attackers > 0).collect();
    if !attacked.is_empty() {
        out.push_str("\nAttackers (devices that tamper with the update they report):\n\n");
        for run in attacked {
            let s = &run.summary;
            let reports: usize = run.records.iter().map(|r| r.attackers).sum();
            let all: usize = run.records.iter().map(|r| r.clients).sum();
            out.push_str(&format!(
                "- `{}`: {} of {} devices, {}; {reports} of the {all} aggregated reports were \
                 theirs; updates combined by {}.\n",
                cell(&s.run),
                s.attackers,
                s.clients,
                cell(s.attack.as_deref().unwrap_or("tampering")),
                s.robust
                    .as_deref()
                    .unwrap_or("the algorithm's own averaging"),
            ));
        }
    }
    let private: Vec<&RunData> = runs
        .iter()
        .filter(|r| r.summary.privacy.is_some())
        .collect();
    if !private.is_empty() {
        out.push_str("\nPrivacy (secure aggregation and differential privacy):\n\n");
        for run in private {
            let s = &run.summary;
            let mean = |f: fn(&RoundRecord) -> Option<f64>| {
                let v: Vec<f64> = run.records.iter().filter_map(f).collect();
                (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
            };
            let mut line = format!(
                "- `{}`: {}",
                cell(&s.run),
                cell(s.privacy.as_deref().unwrap_or(""))
            );
            if let Some(e) = s.final_epsilon {
                line.push_str(&format!("; ε = {e:.3} after {} rounds", s.rounds));
            }
            if let Some(up) = mean(|r| r.secagg_up_bytes_per_client) {
                line.push_str(&format!("; SecAgg+ {} up", bytes(up)));
            }
            if let Some(down) = mean(|r| r.secagg_down_bytes_per_client) {
                line.push_str(&format!(" and {} down per device per round", bytes(down)));
            }
            if let Some(t) = mean(|r| r.secagg_server_s) {
                line.push_str(&format!(", {} of server time per round", duration(t)));
            }
            if let Some(t) = mean(|r| r.dp_server_s) {
                line.push_str(&format!(
                    "; DP {} of server time per round, no extra bytes",
                    duration(t)
                ));
            }
            out.push_str(&line);
            out.push_str(".\n");
        }
    }
    out.push_str("\nCommands:\n\n");
    for run in &runs {
        out.push_str(&format!(
            "- `{}` ({}):\n\n  ```\n  {}\n  ```\n",
            run.summary.run,
            run.dir.display(),
            run.summary.command
        ));
    }
    Ok(out)
}

/// A table cell: `|` escaped, newlines flattened.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// Bytes with a binary unit: `512 B`, `1.5 KiB`, `23.4 MiB`, `1.20 GiB`.
pub fn bytes(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    match unit {
        0 => format!("{value:.0} B"),
        _ if value >= 100.0 => format!("{value:.0} {}", UNITS[unit]),
        _ if value >= 10.0 => format!("{value:.1} {}", UNITS[unit]),
        _ => format!("{value:.2} {}", UNITS[unit]),
    }
}

/// Seconds in the largest fitting unit: `850 ms`, `42.0 s`, `12.5 min`, `3.20 h`.
pub fn duration(seconds: f64) -> String {
    if seconds < 1.0 {
        format!("{:.0} ms", seconds * 1000.0)
    } else if seconds < 120.0 {
        format!("{seconds:.1} s")
    } else if seconds < 7200.0 {
        format!("{:.1} min", seconds / 60.0)
    } else {
        format!("{:.2} h", seconds / 3600.0)
    }
}

/// One CSV row for `record`, columns as [`CSV_HEADER`]; absent values are empty cells.
fn csv_row(r: &RoundRecord) -> String {
    let opt = |v: Option<f32>| v.map(|v| v.to_string()).unwrap_or_default();
    let opt64 = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    [
        csv_text(&r.run),
        csv_text(&r.algorithm),
        r.round.to_string(),
        r.clients.to_string(),
        r.dropped.to_string(),
        r.train_loss.to_string(),
        opt(r.heldout_loss),
        opt(r.perplexity),
        opt(r.rouge_l),
        r.round_time_s.to_string(),
        r.sim_time_s.to_string(),
        r.bytes_up.to_string(),
        r.bytes_down.to_string(),
        r.total_bytes.to_string(),
        r.host_wall_s.to_string(),
        r.compute_s.to_string(),
        r.eval_s.to_string(),
        r.peak_rss_bytes.map(|v| v.to_string()).unwrap_or_default(),
        r.attackers.to_string(),
        opt64(r.epsilon),
        opt64(r.secagg_up_bytes_per_client),
        opt64(r.secagg_down_bytes_per_client),
        opt64(r.secagg_server_s),
        opt64(r.dp_server_s),
    ]
    .join(",")
}

/// A CSV text field, quoted (with doubled quotes) when it holds a comma, quote or newline.
fn csv_text(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

fn io(path: &Path, source: std::io::Error) -> ReportError {
    ReportError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run whose held-out loss falls by `step` a round from 3.0, evaluated every round
    /// except the second; each round takes `round_s` simulated seconds and moves
    /// `up`/`down` bytes per client (4 clients).
    fn run(
        label: &str,
        rounds: u64,
        step: f32,
        round_s: f64,
        up: u64,
        down: u64,
    ) -> (Vec<RoundRecord>, RunSummary) {
        let clients = 4;
        let mut records = Vec::new();
        let mut total = 0;
        for round in 1..=rounds {
            let loss = 3.0 - step * round as f32;
            let evaluated = round != 2;
            total += clients as u64 * (up + down);
            records.push(RoundRecord {
                run: label.into(),
                algorithm: "fedkseed".into(),
                round,
                clients,
                attackers: 0,
                dropped: 1,
                train_loss: loss + 0.1,
                heldout_loss: evaluated.then_some(loss),
                perplexity: evaluated.then_some(loss.exp()),
                rouge_l: None,
                round_time_s: round_s,
                sim_time_s: round_s * round as f64,
                bytes_up: clients as u64 * up,
                bytes_down: clients as u64 * down,
                total_bytes: total,
                host_wall_s: 0.5,
                compute_s: 0.4,
                eval_s: 0.05,
                peak_rss_bytes: Some(100 << 20),
                epsilon: None,
                secagg_up_bytes_per_client: None,
                secagg_down_bytes_per_client: None,
                secagg_server_s: None,
                dp_server_s: None,
            });
        }
        let last = 3.0 - step * rounds as f32;
        let summary = RunSummary {
            run: label.into(),
            algorithm: "fedkseed".into(),
            model: "tiny".into(),
            clients: 50,
            attackers: 0,
            attack: None,
            robust: None,
            privacy: None,
            final_epsilon: None,
            rounds,
            initial_heldout_loss: 3.0,
            final_heldout_loss: last,
            final_perplexity: last.exp(),
            final_rouge_l: None,
            sim_time_s: round_s * rounds as f64,
            bytes_up_per_client_round: up as f64,
            bytes_down_per_client_round: down as f64,
            host_wall_s: 0.5 * rounds as f64,
            peak_rss_bytes: Some(100 << 20),
            command: format!("fedtune simulate {label}.toml"),
        };
        (records, summary)
    }

    #[test]
    fn run_folder_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (records, summary) = run("a,\"b\"", 3, 0.2, 10.0, 100, 2000);
        let folder = dir.path().join("nested/run");
        write_run(&folder, &records, &summary).unwrap();
        let back = read_run(&folder).unwrap();
        assert_eq!(back.records, records);
        assert_eq!(back.summary, summary);
        let csv = std::fs::read_to_string(folder.join(files::METRICS_CSV)).unwrap();
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0], CSV_HEADER);
        assert_eq!(lines[0].split(',').count(), 24);
        // The label is quoted; round 2 was not evaluated, so its loss cells are empty.
        assert!(
            lines[2].starts_with("\"a,\"\"b\"\"\",fedkseed,2,4,1,"),
            "{}",
            lines[2]
        );
        assert!(lines[2].contains(",,,,10,20,"), "{}", lines[2]);
    }

    #[test]
    fn reading_names_the_bad_line() {
        let dir = tempfile::tempdir().unwrap();
        let (records, summary) = run("x", 2, 0.1, 1.0, 1, 1);
        write_run(dir.path(), &records, &summary).unwrap();
        let path = dir.path().join(files::METRICS_JSONL);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"run\": 3}\n");
        std::fs::write(&path, text).unwrap();
        let err = read_run(dir.path()).unwrap_err().to_string();
        assert!(err.contains("metrics.jsonl line 3"), "{err}");
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(
            read_run(dir.path()),
            Err(ReportError::NoRounds { .. })
        ));
        assert!(matches!(report(&[], None), Err(ReportError::NoRuns)));
    }

    #[test]
    fn report_shows_the_privacy_settings_and_epsilon() {
        let dir = tempfile::tempdir().unwrap();
        let (mut records, mut summary) = run("private", 2, 0.1, 1.0, 10, 10);
        for (i, r) in records.iter_mut().enumerate() {
            r.epsilon = Some(1.0 + i as f64);
            r.dp_server_s = Some(0.002);
            r.secagg_up_bytes_per_client = Some(2048.0);
            r.secagg_down_bytes_per_client = Some(1024.0);
            r.secagg_server_s = Some(0.001);
        }
        summary.privacy = Some("SecAgg+ (clip 10), distributed DP (z = 1, C = 1)".into());
        summary.final_epsilon = Some(2.0);
        let (plain_records, plain) = run("plain", 2, 0.1, 1.0, 10, 10);
        write_run(&dir.path().join("a"), &records, &summary).unwrap();
        write_run(&dir.path().join("b"), &plain_records, &plain).unwrap();
        let table = report(&[dir.path().join("a"), dir.path().join("b")], None).unwrap();
        assert!(table.contains("Privacy (secure aggregation and differential privacy)"));
        assert!(
            table.contains("- `private`: SecAgg+ (clip 10), distributed DP (z = 1, C = 1); ε = 2.000 after 2 rounds; SecAgg+ 2.00 KiB up and 1.00 KiB down per device per round, 1 ms of server time per round; DP 2 ms of server time per round, no extra bytes."),
            "{table}"
        );
        assert!(!table.contains("- `plain`:"), "{table}");
        let csv = std::fs::read_to_string(dir.path().join("a").join(files::METRICS_CSV)).unwrap();
        assert!(
            csv.lines()
                .nth(2)
                .unwrap()
                .ends_with(",2,2048,1024,0.001,0.002"),
            "{csv}"
        );
    }

    #[test]
    fn time_to_target_uses_evaluated_rounds_only() {
        let (records, _) = run("x", 5, 0.2, 10.0, 1, 1);
        // Losses 2.8, (2.6 not evaluated), 2.4, 2.2, 2.0 at 10, 20, 30, 40, 50 s.
        assert_eq!(time_to_target(3.0, &records, 2.8), Some(10.0));
        assert_eq!(time_to_target(3.0, &records, 2.6), Some(30.0));
        assert_eq!(time_to_target(3.0, &records, 1.9), None);
        assert_eq!(time_to_target(2.5, &records, 2.6), Some(0.0));
    }

    #[test]
    fn report_compares_runs() {
        let dir = tempfile::tempdir().unwrap();
        // Fast learner with small messages, slow learner with large ones.
        let (ra, sa) = run("fedkseed", 5, 0.2, 10.0, 3000, 40);
        let (rb, sb) = run("lora", 5, 0.1, 60.0, 2 << 20, 2 << 20);
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        write_run(&a, &ra, &sa).unwrap();
        write_run(&b, &rb, &sb).unwrap();

        let table = report(&[a.clone(), b.clone()], Some(2.55)).unwrap();
        eprintln!("{table}");
        let rows: Vec<&str> = table
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| ---"))
            .collect();
        assert_eq!(rows.len(), 3, "header and two runs");
        assert!(rows[0].contains("sim. time to loss ≤ 2.550"));
        assert!(!rows[0].contains("Rouge-L"), "no run has Rouge-L");
        let a_cells: Vec<&str> = rows[1].split('|').map(str::trim).collect();
        let b_cells: Vec<&str> = rows[2].split('|').map(str::trim).collect();
        // | run | algorithm | clients | rounds | loss | ppl | target | time | up | down |
        //   total | memory | host |  (leading empty cell from the first '|')
        assert_eq!(&a_cells[1..5], ["fedkseed", "fedkseed", "50", "5"]);
        assert_eq!(a_cells[5], "3.000 → 2.000");
        assert_eq!(a_cells[6], format!("{:.2}", 2.0f32.exp()));
        // a reaches 2.55 at round 3 (2.4 <= 2.55; round 2 was not evaluated): 30 s.
        assert_eq!(a_cells[7], "30.0 s");
        // b's losses 2.9, 2.8, 2.7, 2.6, 2.5: first evaluated <= 2.55 is round 5, 300 s.
        assert_eq!(b_cells[7], "5.0 min");
        assert_eq!(a_cells[9], "2.93 KiB");
        assert_eq!(a_cells[10], "40 B");
        assert_eq!(b_cells[9], "2.00 MiB");
        // a: 5 rounds × 4 clients × 3040 B = 60,800 B = 59.4 KiB.
        assert_eq!(a_cells[11], "59.4 KiB");
        assert_eq!(a_cells[12], "100 MiB");
        assert_eq!(a_cells[13], "2.5 s");
        assert!(table.contains("fedtune simulate lora.toml"));

        // Without a target: the higher final loss (b's 2.5) is the target; a reaches it at
        // round 3 (2.4), b at round 5.
        let table = report(&[a, b], None).unwrap();
        assert!(table.contains("loss ≤ 2.500"));
        assert!(table.contains("the highest final loss"));
        let rows: Vec<&str> = table
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| ---"))
            .collect();
        assert_eq!(rows[1].split('|').map(str::trim).nth(7), Some("30.0 s"));
        assert_eq!(rows[2].split('|').map(str::trim).nth(7), Some("5.0 min"));
        assert!(!table.contains("Attackers"), "no run had attackers");
    }

    #[test]
    fn report_shows_the_attackers() {
        let dir = tempfile::tempdir().unwrap();
        let (mut records, mut summary) = run("median", 3, 0.1, 1.0, 10, 10);
        records.iter_mut().for_each(|r| r.attackers = 1);
        summary.attackers = 10;
        summary.attack = Some("scaled ×-4".into());
        summary.robust = Some("median".into());
        let (honest, honest_summary) = run("honest", 3, 0.1, 1.0, 10, 10);
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        write_run(&a, &records, &summary).unwrap();
        write_run(&b, &honest, &honest_summary).unwrap();
        let table = report(&[a.clone(), b], None).unwrap();
        assert!(
            table.contains("| median | fedkseed | 50 (10 attacking) |"),
            "{table}"
        );
        assert!(table.contains("| honest | fedkseed | 50 |"), "{table}");
        assert!(
            table.contains(
                "- `median`: 10 of 50 devices, scaled ×-4; 3 of the 12 aggregated reports were \
                 theirs; updates combined by median."
            ),
            "{table}"
        );
        assert!(!table.contains("`honest`: "), "{table}");
        let back = read_run(&a).unwrap();
        assert_eq!((back.summary, back.records), (summary, records));
    }

    #[test]
    fn units() {
        assert_eq!(bytes(512.0), "512 B");
        assert_eq!(bytes(1536.0), "1.50 KiB");
        assert_eq!(bytes(150.0 * 1024.0 * 1024.0), "150 MiB");
        assert_eq!(duration(0.25), "250 ms");
        assert_eq!(duration(7200.0), "2.00 h");
    }
}
