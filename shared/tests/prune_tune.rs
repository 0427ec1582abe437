//! FedSpine's local round on a small GQA model: LoRA-gradient importance against its formula,
//! pruning during tuning reaching its target with the adapters following, determinism.

mod gqa_model;

use burn::module::Module;
use burn::tensor::Tensor;
use fedtune_shared::lora::adapter::TargetModule;
use fedtune_shared::lora::aggregation::masked::scatter_adapter;
use fedtune_shared::lora::attach::{adapter_weights, attach_fresh, projection};
use fedtune_shared::lora::config::LoraConfig;
use fedtune_shared::lora::train::{LoraTrainer, TrainConfig, TrainExample};
use fedtune_shared::model::Llama;
use fedtune_shared::progress::Silent;
use fedtune_shared::prune::lora_importance::layer_importance;
use fedtune_shared::prune::prune_tune::{LocalTuning, PruneTuneRound, prune_and_tune};
use fedtune_shared::prune::schedule::{ImportanceKind, PruneSchedule};
use fedtune_shared::prune::units::{LayerShape, head_columns, query_heads};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn lora() -> LoraConfig {
    LoraConfig {
        rank: 4,
        targets: TargetModule::ALL.to_vec(),
        dropout: 0.0,
        ..LoraConfig::default()
    }
}

fn train() -> TrainConfig {
    TrainConfig {
        lr: 1e-2,
        warmup_steps: 0,
        batch_size: 2,
        ..TrainConfig::default()
    }
}

fn data() -> Vec<TrainExample> {
    gqa_model::sequences(12, 5)
        .into_iter()
        .map(TrainExample::text)
        .collect()
}

fn adapted(seed: u64) -> Llama {
    attach_fresh(gqa_model::model(1), &lora(), seed).train()
}

fn host(t: Tensor<2>) -> (Vec<f64>, [usize; 2]) {
    let dims = t.dims();
    let v: Vec<f32> = t.into_data().try_into_vec_as().expect("f32");
    (v.into_iter().map(f64::from).collect(), dims)
}

/// `|G ⊙ (W + s A B)|` with `G = A dB + dA B − dA dB`, by hand on the host, `[in, out]`.
fn importance_by_hand(
    model: &Llama,
    grads: &burn::optim::GradientsParams,
    target: TargetModule,
) -> (Vec<f64>, [usize; 2]) {
    let linear = projection(&model.layers[1], target);
    let adapter = linear.adapter.as_ref().expect("adapter");
    let (a, [d_in, r]) = host(adapter.a.val().inner());
    let (b, [_, d_out]) = host(adapter.b.val().inner());
    let (da, _) = host(grads.get::<2>(adapter.a.id).expect("dA"));
    let (db, _) = host(grads.get::<2>(adapter.b.id).expect("dB"));
    let (w, _) = host(linear.weight.val().inner());
    let s = f64::from(adapter.scale);
    let mut out = vec![0.0; d_in * d_out];
    for i in 0..d_in {
        for o in 0..d_out {
            let (mut g, mut ab) = (0.0, 0.0);
            for k in 0..r {
                let (ak, dak) = (a[i * r + k], da[i * r + k]);
                let (bk, dbk) = (b[k * d_out + o], db[k * d_out + o]);
                g += ak * dbk + dak * bk - dak * dbk;
                ab += ak * bk;
            }
            out[i * d_out + o] = (g * (w[i * d_out + o] + s * ab)).abs();
        }
    }
    (out, [d_in, d_out])
}

#[test]
fn lora_importance_matches_its_formula() {
    // Two steps, so that B is no longer zero and every term of G counts.
    let mut trainer = LoraTrainer::new(train(), 0);
    let batch = &data()[..2];
    let (model, _) = trainer.step(adapted(3), batch);
    let mut checked = false;
    let _ = trainer.step_observed(model, batch, |m, grads| {
        let got = layer_importance(&m.layers[1], grads);
        let shape = LayerShape::of(&m.layers[1]);
        let (g, d) = (shape.group(), shape.head_dim);
        let cols = |t| {
            let (v, [rows, cols]) = importance_by_hand(m, grads, t);
            (0..cols)
                .map(|c| (0..rows).map(|r| v[r * cols + c]).sum::<f64>())
                .collect::<Vec<f64>>()
        };
        let rows = |t| {
            let (v, [_, cols]) = importance_by_hand(m, grads, t);
            v.chunks(cols)
                .map(|r| r.iter().sum::<f64>())
                .collect::<Vec<f64>>()
        };
        let (q, k, v, o) = (
            cols(TargetModule::QProj),
            cols(TargetModule::KProj),
            cols(TargetModule::VProj),
            rows(TargetModule::OProj),
        );
        let (gate, up, down) = (
            cols(TargetModule::GateProj),
            cols(TargetModule::UpProj),
            rows(TargetModule::DownProj),
        );
        let heads: Vec<f64> = (0..shape.num_kv_heads)
            .map(|h| {
                let qc = head_columns(&query_heads(&[h], g), d);
                let kc = head_columns(&[h], d);
                qc.iter().map(|&c| q[c] + o[c]).sum::<f64>()
                    + kc.iter().map(|&c| k[c] + v[c]).sum::<f64>()
            })
            .collect();
        let channels: Vec<f64> = (0..shape.intermediate)
            .map(|j| gate[j] + up[j] + down[j])
            .collect();
        let mean = (heads.iter().sum::<f64>() + channels.iter().sum::<f64>())
            / shape.prunable_params() as f64;
        let head_params = shape.attention_unit_params() as f64;
        let channel_params = shape.ffn_channel_params() as f64;
        for (x, y) in got.kv_heads.iter().zip(&heads) {
            let want = y / head_params / mean;
            assert!((x - want).abs() <= 1e-3 * want.abs(), "head {x} vs {want}");
        }
        for (x, y) in got.ffn_channels.iter().zip(&channels) {
            let want = y / channel_params / mean;
            assert!(
                (x - want).abs() <= 1e-3 * want.abs() + 1e-9,
                "channel {x} vs {want}"
            );
        }
        checked = true;
    });
    assert!(checked);
}

fn round(seed: u64, schedule: &PruneSchedule) -> PruneTuneRound {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (lora, train) = (lora(), train());
    let tuning = LocalTuning {
        lora: &lora,
        train: &train,
        first_step: 0,
        local_steps: 8,
    };
    prune_and_tune(
        adapted(7),
        &tuning,
        schedule,
        &data(),
        &mut rng,
        &mut Silent,
    )
    .expect("prune and tune")
}

#[test]
fn pruning_while_tuning_reaches_the_target_with_adapters_following() {
    let full = gqa_model::model(1);
    let shapes: Vec<LayerShape> = full.layers.iter().map(LayerShape::of).collect();
    for importance in [ImportanceKind::LoraGradient, ImportanceKind::Flap] {
        let schedule = PruneSchedule {
            target: 0.3,
            every: 2,
            protect_first: 1,
            protect_last: true,
            importance,
        };
        let out = round(9, &schedule);
        assert!(
            (out.removed_ratio - 0.3).abs() < 0.02,
            "{importance:?}: removed {}",
            out.removed_ratio
        );
        assert_eq!(out.report.steps, 8);
        assert!(out.report.mean_loss.is_finite());
        // Protected layers kept everything; the others shrank to their records.
        for (i, (kept, shape)) in out.kept.iter().zip(&shapes).enumerate() {
            let layer = LayerShape::of(&out.model.layers[i]);
            assert_eq!(layer.num_kv_heads, kept.kv_heads.len());
            assert_eq!(layer.intermediate, kept.ffn_channels.len());
            if i == 0 || i == 3 {
                assert_eq!(kept.kv_heads.len(), shape.num_kv_heads);
                assert_eq!(kept.ffn_channels.len(), shape.intermediate);
            }
        }
        // The tuned adapter is in the kept coordinates: it scatters onto the full model.
        let adapter = adapter_weights(&out.model, lora().scaling).expect("adapters");
        assert_eq!(adapter.rank, 4);
        scatter_adapter(&adapter, &out.kept, &shapes).expect("adapter fits the kept units");
        // The work shrank with the model: less than 8 full-size iterations.
        let prunable: usize = shapes.iter().map(LayerShape::prunable_params).sum();
        assert!(out.param_steps < 8 * prunable as u64);
        // Same seed, same data: the same units go.
        assert_eq!(round(9, &schedule).kept, out.kept, "{importance:?}");
    }
}

#[test]
fn ratio_zero_prunes_nothing() {
    let schedule = PruneSchedule {
        target: 0.0,
        ..PruneSchedule::default()
    };
    let out = round(1, &schedule);
    assert_eq!(out.removed_ratio, 0.0);
    let valid = out.model.valid();
    assert_eq!(valid.layers.len(), 4);
}
