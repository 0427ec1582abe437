//! Plots and the report for synthetic runs written as the harness writes them: every file
//! appears, PNGs decode at the right size with every run's colour in them, SVGs carry the
//! axis descriptions and legend labels.
//!
//! Set `FEDTUNE_KEEP_PLOTS=DIR` to keep the plots in `DIR` for looking at.

use std::path::PathBuf;

use fedtune_simulator::plot::{PlotRun, plot_run_dirs, write_plots};
use fedtune_simulator::record::{RoundRecord, RunSummary};
use fedtune_simulator::report::{report, write_run};

const ALGORITHMS: [(&str, f64, u64, f64); 6] = [
    // (label, loss decay per round, bytes per device per round, simulated seconds per round)
    ("fedkseed", 0.015, 4_096, 30.0),
    ("fedkseed-pro", 0.02, 4_096, 32.0),
    ("lora-fedavg", 0.05, 1_800_000, 95.0),
    ("hetlora", 0.045, 1_200_000, 80.0),
    ("flexlora", 0.055, 1_500_000, 90.0),
    ("fedspine", 0.06, 700_000, 60.0),
];

/// 20 rounds of a run whose held-out loss decays towards 2.6 from 3.4, evaluated every other
/// round, with per-algorithm speed and message sizes; instruction-style Rouge-L for the LoRA
/// family only, so that a plot with partial Rouge-L is drawn too.
fn synthetic(label: &str, decay: f64, bytes: u64, round_s: f64) -> (Vec<RoundRecord>, RunSummary) {
    let clients = 10;
    let loss = |round: u64| (2.6 + 0.8 * (-decay * round as f64 * 3.0).exp()) as f32;
    let mut records = Vec::new();
    for round in 1..=20u64 {
        let evaluated = round % 2 == 0;
        records.push(RoundRecord {
            run: label.into(),
            algorithm: label.into(),
            round,
            clients,
            attackers: 0,
            dropped: (round % 3) as usize,
            train_loss: loss(round) - 0.05,
            heldout_loss: evaluated.then(|| loss(round)),
            perplexity: evaluated.then(|| loss(round).exp()),
            rouge_l: (evaluated && label.contains("lora"))
                .then(|| (0.1 + 0.3 * (1.0 - (-decay * round as f64 * 3.0).exp())) as f32),
            round_time_s: round_s,
            sim_time_s: round_s * round as f64,
            bytes_up: clients as u64 * bytes / 2,
            bytes_down: clients as u64 * bytes,
            total_bytes: round * clients as u64 * (bytes + bytes / 2),
            host_wall_s: 0.1,
            compute_s: 0.08,
            eval_s: 0.01,
            peak_rss_bytes: Some(300 << 20),
            epsilon: None,
            secagg_up_bytes_per_client: None,
            secagg_down_bytes_per_client: None,
            secagg_server_s: None,
            dp_server_s: None,
        });
    }
    let summary = RunSummary {
        run: label.into(),
        algorithm: label.into(),
        model: "synthetic".into(),
        clients: 50,
        attackers: 0,
        attack: None,
        robust: None,
        privacy: None,
        final_epsilon: None,
        rounds: 20,
        initial_heldout_loss: loss(0),
        final_heldout_loss: loss(20),
        final_perplexity: loss(20).exp(),
        final_rouge_l: label.contains("lora").then_some(0.3),
        sim_time_s: round_s * 20.0,
        bytes_up_per_client_round: bytes as f64 / 2.0,
        bytes_down_per_client_round: bytes as f64,
        host_wall_s: 2.0,
        peak_rss_bytes: Some(300 << 20),
        command: format!("fedtune simulate --algorithm {label}"),
    };
    (records, summary)
}

#[test]
fn plots_and_report_for_six_runs() {
    let dir = tempfile::tempdir().unwrap();
    let mut run_dirs = Vec::new();
    for (label, decay, bytes, round_s) in ALGORITHMS {
        let (records, summary) = synthetic(label, decay, bytes, round_s);
        let run_dir = dir.path().join(label);
        write_run(&run_dir, &records, &summary).unwrap();
        run_dirs.push(run_dir);
    }
    let out = std::env::var_os("FEDTUNE_KEEP_PLOTS")
        .map_or_else(|| dir.path().join("plots"), PathBuf::from);
    let files = plot_run_dirs(&run_dirs, &out).unwrap();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for plot in [
        "heldout_loss_vs_round",
        "heldout_loss_vs_sim_time",
        "heldout_loss_vs_total_bytes",
        "train_loss_vs_round",
        "rouge_l_vs_round",
    ] {
        for ext in ["png", "svg"] {
            assert!(
                names.contains(&format!("{plot}.{ext}")),
                "{plot}.{ext} in {names:?}"
            );
        }
    }

    for file in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "png"))
    {
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(file).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut pixels).unwrap();
        assert_eq!((info.width, info.height), (1200, 750));
        let colours: std::collections::HashSet<[u8; 3]> = pixels[..info.buffer_size()]
            .chunks_exact(3)
            .map(|p| [p[0], p[1], p[2]])
            .collect();
        // Every run's line colour (Tableau 10 in run order); only the LoRA runs have Rouge-L.
        let rouge = file.to_string_lossy().contains("rouge_l");
        let palette = [
            ([31, 119, 180], !rouge),
            ([255, 127, 14], !rouge),
            ([44, 160, 44], true),
            ([214, 39, 40], true),
            ([148, 103, 189], true),
            ([140, 86, 75], !rouge),
        ];
        for (colour, expected) in palette {
            assert_eq!(
                colours.contains(&colour),
                expected,
                "{colour:?} in {}",
                file.display()
            );
        }
        let dark = pixels
            .chunks_exact(3)
            .filter(|p| p.iter().all(|&c| c < 60))
            .count();
        assert!(
            dark > 2_000,
            "{}: {dark} dark pixels (text, axes)",
            file.display()
        );
    }

    let svg = std::fs::read_to_string(out.join("heldout_loss_vs_sim_time.svg")).unwrap();
    for text in [
        "simulated wall-clock time (min)",
        "held-out loss (nats/token)",
        "perplexity",
        "fedkseed-pro",
        "fedspine",
    ] {
        assert!(svg.contains(text), "{text} missing from the SVG");
    }
    let bytes_svg = std::fs::read_to_string(out.join("heldout_loss_vs_total_bytes.svg")).unwrap();
    assert!(bytes_svg.contains(" MB") && bytes_svg.contains(" kB"));

    let table = report(&run_dirs, None).unwrap();
    eprintln!("{table}");
    assert_eq!(
        table
            .lines()
            .filter(|l| l.starts_with("| ") && !l.starts_with("| ---"))
            .count(),
        7
    );
    assert!(table.contains("Rouge-L F"));

    // The plain API: no initial point, and a run with no evaluation is an error.
    let (records, _) = synthetic("x", 0.1, 10, 1.0);
    write_plots(
        &[PlotRun::from(("x".to_string(), records.clone()))],
        &dir.path().join("p2"),
    )
    .unwrap();
    let unevaluated: Vec<RoundRecord> = records
        .into_iter()
        .map(|r| RoundRecord {
            heldout_loss: None,
            ..r
        })
        .collect();
    assert!(
        write_plots(
            &[PlotRun::from(("x".to_string(), unevaluated))],
            &dir.path().join("p3")
        )
        .is_err()
    );
}
