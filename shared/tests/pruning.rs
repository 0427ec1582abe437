//! Structured pruning on tiny grouped-query models: the pruned tensors have the shapes the plan
//! says, a pruned model computes exactly what the full model computes with the same units
//! zeroed, FLAP's bias compensation adds `W[pruned, :]ᵀ · mean` and brings the output back
//! toward the full model's, the scores follow their formulas, and kept-unit records map pruned
//! tensors back to full coordinates.

use burn::module::{Module, Param};
use burn::nn::RmsNormConfig;
use burn::tensor::{Device, Tensor, TensorData};
use fedtune_shared::checkpoint::MemorySource;
use fedtune_shared::lora::attach::{attach_fresh, projection_mut};
use fedtune_shared::lora::{LoraConfig, LoraScaling, TargetModule};
use fedtune_shared::model::attention::Attention;
use fedtune_shared::model::block::{DecoderLayer, ProjectionInput};
use fedtune_shared::model::linear::Linear;
use fedtune_shared::model::mlp::Mlp;
use fedtune_shared::model::{Llama, TokenBatch};
use fedtune_shared::prune::flap::{attention_fluctuation, standardise};
use fedtune_shared::prune::{
    Axis, CalibrationStats, ChannelStats, KeptUnits, LayerShape, LayerStats, PlanError,
    PruneOptions, PrunePlan, RatioBasis, calibrate, compensation_bias, gather, layer_flap_scores,
    layer_magnitude, model_params, plan_flap, plan_magnitude, prunable_params, prune_model,
    scatter,
};

mod gqa_model;
use gqa_model::{config, model, sequences};

fn host(t: Tensor<2>) -> Vec<f32> {
    t.into_data().try_into_vec_as().unwrap()
}

fn host1(t: Tensor<1>) -> Vec<f32> {
    t.into_data().try_into_vec_as().unwrap()
}

/// Logits of every real position of every sequence, flattened.
fn logits(model: &Llama, sequences: &[Vec<u32>]) -> Vec<f32> {
    let batch = TokenBatch::right_padded(sequences, 0, &model.device());
    let [_, seq] = batch.dims();
    let all: Vec<f32> = model
        .forward_batch(&batch)
        .into_data()
        .try_into_vec_as()
        .unwrap();
    let vocab = model.vocab_size();
    sequences
        .iter()
        .enumerate()
        .flat_map(|(b, s)| all[b * seq * vocab..(b * seq + s.len()) * vocab].to_vec())
        .collect()
}

/// `max |a − b| / max |b|`.
fn relative_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let diff = a
        .iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / b.iter().fold(0.0f32, |m, y| m.max(y.abs()))
}

fn mean_squared_difference(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64
}

/// Sets the stored `[in, out]` weight of `linear`.
fn set_weight(linear: &mut Linear, values: Vec<f32>, shape: [usize; 2], device: &Device) {
    linear.weight = Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device));
}

/// Zeroes the given columns (or rows) of a stored `[in, out]` matrix.
fn zero(values: &mut [f32], [rows, cols]: [usize; 2], axis: Axis, indices: &[usize]) {
    for &i in indices {
        match axis {
            Axis::Rows => values[i * cols..(i + 1) * cols].fill(0.0),
            Axis::Columns => (0..rows).for_each(|r| values[r * cols + i] = 0.0),
        }
    }
}

/// Zeroes, in place, every weight (base and adapter) of a projection that the removed `indices`
/// own along `axis`: columns of `W` and `B` for outputs, rows of `W` and `A` for inputs.
fn zero_units(linear: &mut Linear, axis: Axis, indices: &[usize], device: &Device) {
    let shape = linear.weight.dims();
    let mut w = host(linear.weight.val());
    zero(&mut w, shape, axis, indices);
    set_weight(linear, w, shape, device);
    if let Some(adapter) = &mut linear.adapter {
        let factor = match axis {
            Axis::Columns => &mut adapter.b,
            Axis::Rows => &mut adapter.a,
        };
        let shape = factor.dims();
        let mut v = host(factor.val());
        zero(&mut v, shape, axis, indices);
        *factor = Param::from_tensor(Tensor::from_data(TensorData::new(v, shape), device));
    }
}

/// The full model with the units `plan` removes set to zero instead.
fn masked(mut model: Llama, plan: &PrunePlan) -> Llama {
    let device = model.device();
    for (layer, kept) in model.layers.iter_mut().zip(&plan.keep) {
        let shape = LayerShape::of(layer);
        let (g, d) = (shape.group(), shape.head_dim);
        let gone = KeptUnits {
            layer: kept.layer,
            kv_heads: kept.pruned_kv_heads(shape.num_kv_heads),
            ffn_channels: kept.pruned_ffn_channels(shape.intermediate),
        };
        let (query, kv) = (gone.query_columns(g, d), gone.kv_columns(d));
        let a = &mut layer.attention;
        zero_units(&mut a.q_proj, Axis::Columns, &query, &device);
        zero_units(&mut a.k_proj, Axis::Columns, &kv, &device);
        zero_units(&mut a.v_proj, Axis::Columns, &kv, &device);
        zero_units(&mut a.o_proj, Axis::Rows, &query, &device);
        let m = &mut layer.mlp;
        zero_units(&mut m.gate_proj, Axis::Columns, &gone.ffn_channels, &device);
        zero_units(&mut m.up_proj, Axis::Columns, &gone.ffn_channels, &device);
        zero_units(&mut m.down_proj, Axis::Rows, &gone.ffn_channels, &device);
    }
    model
}

/// LoRA adapters on all seven projections with non-zero `B`, so that slicing them matters.
fn with_adapters(model: Llama) -> Llama {
    let config = LoraConfig {
        rank: 4,
        scaling: LoraScaling {
            alpha: 8.0,
            rslora: false,
        },
        dropout: 0.0,
        targets: TargetModule::ALL.to_vec(),
    };
    let mut model = attach_fresh(model, &config, 7);
    let device = model.device();
    let mut seed = 11u64;
    for layer in &mut model.layers {
        for target in TargetModule::ALL {
            let adapter = projection_mut(layer, target).adapter.as_mut().unwrap();
            let shape = adapter.b.dims();
            seed += 1;
            let values: Vec<f32> = (0..shape[0] * shape[1])
                .map(|i| (((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 1000.0 - 0.5) * 0.2)
                .collect();
            adapter.b =
                Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), &device));
        }
    }
    model
}

/// A plan written by hand that removes heads and channels in every layer but the last.
fn hand_plan() -> PrunePlan {
    let c = config();
    let keep = |layer, kv_heads: Vec<usize>, step: usize| KeptUnits {
        layer,
        kv_heads,
        ffn_channels: (0..c.intermediate_size).step_by(step).collect(),
    };
    PrunePlan {
        keep: vec![
            keep(0, vec![0, 2], 2),
            keep(1, vec![1], 3),
            keep(2, vec![0, 1], 1),
            keep(3, vec![0, 1, 2], 1),
        ],
        compensation: None,
    }
}

#[test]
fn pruned_tensors_have_the_planned_shapes_and_the_target_size() {
    let full = model(1);
    let c = config();
    let stats = calibrate(&full, &sequences(12, 1));
    let prunable = prunable_params(&full);
    assert_eq!(prunable, c.num_layers * (3 * 1536 + 64 * 96));
    let mut heads_pruned = 0;
    for ratio in [0.1, 0.3, 0.5] {
        let plan = plan_flap(&stats, &full, ratio, &PruneOptions::default()).unwrap();
        let (pruned, kept) = prune_model(full.clone(), &plan);
        assert_eq!(kept, plan.keep);
        for (layer, kept) in pruned.layers.iter().zip(&kept) {
            let (kv, ffn) = (kept.kv_heads.len(), kept.ffn_channels.len());
            assert!(kv >= 1 && ffn >= 1, "layer {} keeps something", kept.layer);
            let a = &layer.attention;
            assert_eq!((a.num_kv_heads, a.num_heads), (kv, 2 * kv), "groups intact");
            assert_eq!(a.q_proj.weight.dims(), [32, 2 * kv * 8]);
            assert_eq!(a.k_proj.weight.dims(), [32, kv * 8]);
            assert_eq!(a.v_proj.weight.dims(), [32, kv * 8]);
            assert_eq!(a.o_proj.weight.dims(), [2 * kv * 8, 32]);
            assert_eq!(layer.mlp.gate_proj.weight.dims(), [32, ffn]);
            assert_eq!(layer.mlp.up_proj.weight.dims(), [32, ffn]);
            assert_eq!(layer.mlp.down_proj.weight.dims(), [ffn, 32]);
            heads_pruned += 3 - kv;
        }
        let removed = prunable - prunable_params(&pruned);
        assert_eq!(removed, plan.removed_params(&full));
        let achieved = removed as f64 / prunable as f64;
        // The target is approached from below, within one FFN channel (96 parameters).
        assert!(
            achieved <= ratio && ratio - achieved < 96.0 / prunable as f64 + 1e-9,
            "ratio {ratio}: removed {achieved}"
        );
        // Whole-model count: what went, plus the compensation biases (hidden wide, two a layer)
        // of layers that lost inputs.
        let biases: usize = kept
            .iter()
            .map(|k| 32 * ((k.kv_heads.len() < 3) as usize + (k.ffn_channels.len() < 64) as usize))
            .sum();
        assert_eq!(pruned.num_params(), full.num_params() - removed + biases);
        // The pruned model still runs.
        let out = pruned.forward_batch(&TokenBatch::right_padded(
            &sequences(2, 9),
            0,
            &pruned.device(),
        ));
        assert_eq!(out.dims()[2], c.vocab_size);
    }
    assert!(heads_pruned > 0, "some plan removed an attention unit");
}

#[test]
fn a_ratio_of_the_whole_model_counts_every_weight() {
    let full = model(5);
    let c = config();
    let stats = calibrate(&full, &sequences(12, 5));
    let (prunable, total) = (prunable_params(&full), model_params(&full));
    // Tied 64 x 32 embedding, two norms a layer and the final one, no biases yet.
    assert_eq!(total, prunable + 64 * 32 + (2 * c.num_layers + 1) * 32);
    assert_eq!(total, c.num_params());
    for ratio in [0.1, 0.3, 0.5] {
        let target = (ratio * total as f64).round() as usize;
        assert_eq!(RatioBasis::Total.target(&full, ratio), target);
        for compensation in [false, true] {
            let options = PruneOptions {
                ratio_of: RatioBasis::Total,
                bias_compensation: compensation,
                ..PruneOptions::default()
            };
            let plan = plan_flap(&stats, &full, ratio, &options).unwrap();
            let removed = plan.removed_params(&full);
            // Within one unit (one FFN channel, 3 x 32 parameters) of the target, from below.
            assert!(
                removed <= target && target - removed < 96,
                "ratio {ratio} of {total}: removed {removed}, target {target}"
            );
            let (pruned, _) = prune_model(full.clone(), &plan);
            assert_eq!(prunable_params(&pruned), prunable - removed);
            let biases: usize = pruned
                .layers
                .iter()
                .map(|l| {
                    32 * (l.attention.o_proj.bias.is_some() as usize
                        + l.mlp.down_proj.bias.is_some() as usize)
                })
                .sum();
            assert_eq!(biases > 0, compensation);
            assert_eq!(model_params(&pruned), total - removed + biases);
            if !compensation {
                // Still the full model with the removed units zeroed.
                let seqs = sequences(4, 50);
                let reference = logits(&masked(full.clone(), &plan), &seqs);
                let diff = relative_difference(&logits(&pruned, &seqs), &reference);
                assert!(diff < 1e-5, "relative difference {diff}");
            }
        }
    }
    // The same ratio of the whole model removes more than of the prunable part, by the share
    // that cannot be pruned.
    let on = |ratio_of| {
        let options = PruneOptions {
            ratio_of,
            ..PruneOptions::default()
        };
        plan_flap(&stats, &full, 0.3, &options)
            .unwrap()
            .removed_params(&full)
    };
    assert!(on(RatioBasis::Total) > on(RatioBasis::Prunable));
    // Out of reach on the whole-model basis: the error says which basis.
    let options = PruneOptions {
        ratio_of: RatioBasis::Total,
        ..PruneOptions::default()
    };
    let err = plan_flap(&stats, &full, 0.99, &options).unwrap_err();
    assert!(
        matches!(err, PlanError::Unreachable { basis: RatioBasis::Total, reachable, .. } if reachable < 0.99)
    );
    assert!(err.to_string().contains("of the total parameters"), "{err}");
}

#[test]
fn protected_layers_and_minimums_are_respected() {
    let full = model(2);
    let stats = calibrate(&full, &sequences(8, 2));
    let options = PruneOptions {
        protect_first: 1,
        protect_last: true,
        min_ffn_channels: 16,
        ..PruneOptions::default()
    };
    let plan = plan_flap(&stats, &full, 0.3, &options).unwrap();
    for kept in [&plan.keep[0], &plan.keep[3]] {
        assert_eq!(kept.kv_heads, vec![0, 1, 2]);
        assert_eq!(kept.ffn_channels.len(), 64);
    }
    for kept in &plan.keep[1..3] {
        assert!(kept.ffn_channels.len() >= 16 && !kept.kv_heads.is_empty());
    }
    // Two layers down to one head and 16 channels remove 2·(2·1536 + 48·96) = 15360 of 43008.
    assert!(matches!(
        plan_flap(&stats, &full, 0.5, &options),
        Err(PlanError::Unreachable { reachable, .. }) if (reachable - 15360.0 / 43008.0).abs() < 1e-9
    ));
    assert_eq!(
        plan_magnitude(&full, 1.0, &options),
        Err(PlanError::Ratio(1.0))
    );
    let mut other = config();
    other.num_layers = 3;
    let small = Llama::load(&MemorySource::random(other, 1), &Device::flex(), |_, _| {}).unwrap();
    assert!(matches!(
        plan_flap(&calibrate(&small, &sequences(2, 1)), &full, 0.1, &options),
        Err(PlanError::Mismatch(_))
    ));
}

#[test]
#[should_panic(expected = "layer 1: kept key/value heads 3 is out of range")]
fn a_plan_that_does_not_fit_is_refused() {
    let mut plan = hand_plan();
    plan.keep[1].kv_heads = vec![0, 3];
    let _ = prune_model(model(1), &plan);
}

#[test]
fn pruned_model_equals_the_full_model_with_the_units_zeroed() {
    let full = with_adapters(model(3));
    let seqs = sequences(6, 3);
    let stats = calibrate(&full, &seqs);
    let flap = PruneOptions {
        bias_compensation: false,
        ..PruneOptions::default()
    };
    let plans = [
        hand_plan(),
        plan_magnitude(&full, 0.3, &PruneOptions::default()).unwrap(),
        plan_flap(&stats, &full, 0.4, &flap).unwrap(),
    ];
    for plan in plans {
        assert!(plan.compensation.is_none());
        let (pruned, _) = prune_model(full.clone(), &plan);
        let reference = logits(&masked(full.clone(), &plan), &seqs);
        let diff = relative_difference(&logits(&pruned, &seqs), &reference);
        assert!(diff < 1e-5, "relative difference {diff}");
        // And the zeroed units did matter.
        assert!(relative_difference(&logits(&full, &seqs), &reference) > 1e-3);
    }
}

#[test]
fn bias_compensation_adds_the_mean_of_the_removed_inputs() {
    let full = anisotropic(model(4));
    let calibration = sequences(32, 4);
    let stats = calibrate(&full, &calibration);
    let plan = plan_flap(&stats, &full, 0.3, &PruneOptions::default()).unwrap();
    let uncompensated = PrunePlan {
        compensation: None,
        ..plan.clone()
    };
    let (with, _) = prune_model(full.clone(), &plan);
    let (without, _) = prune_model(full.clone(), &uncompensated);

    // By hand on every layer that lost something: bias = Σ_{i removed} mean_i · W[i, :].
    let mut checked = 0;
    for (i, kept) in plan.keep.iter().enumerate() {
        let shape = LayerShape::of(&full.layers[i]);
        let pairs = [
            (
                &full.layers[i].attention.o_proj,
                &with.layers[i].attention.o_proj,
                &stats.layers[i].o_proj,
                complement(&kept.query_columns(2, 8), shape.num_heads * 8),
            ),
            (
                &full.layers[i].mlp.down_proj,
                &with.layers[i].mlp.down_proj,
                &stats.layers[i].down_proj,
                kept.pruned_ffn_channels(64),
            ),
        ];
        for (before, after, inputs, removed) in pairs {
            if removed.is_empty() {
                assert!(after.bias.is_none());
                continue;
            }
            let w = host(before.weight.val());
            let expected: Vec<f64> = (0..32)
                .map(|o| {
                    removed
                        .iter()
                        .map(|&r| inputs.mean[r] * w[r * 32 + o] as f64)
                        .sum()
                })
                .collect();
            let bias = host1(after.bias.as_ref().unwrap().val());
            for (b, e) in bias.iter().zip(&expected) {
                assert!((*b as f64 - e).abs() < 1e-6 + 1e-5 * e.abs(), "{b} vs {e}");
            }
            checked += 1;
        }
    }
    assert!(checked >= 2);

    // With a LoRA adapter, the adapter's share of the removed inputs is compensated too:
    // Σ_{i removed} mean_i · (W + s·A B)[i, :].
    let adapted = with_adapters(model(4));
    let o_proj = &adapted.layers[0].attention.o_proj;
    let adapter = o_proj.adapter.as_ref().unwrap();
    let effective = host(o_proj.weight.val() + adapter.delta());
    let means: Vec<f64> = (0..48).map(|i| (i as f64 - 20.0) / 10.0).collect();
    let removed = [3, 4, 17, 40];
    let bias = host1(compensation_bias(o_proj, &removed, &means));
    for (o, b) in bias.iter().enumerate() {
        let e: f64 = removed
            .iter()
            .map(|&r| means[r] * effective[r * 32 + o] as f64)
            .sum();
        assert!((*b as f64 - e).abs() < 1e-5 * (1.0 + e.abs()), "{b} vs {e}");
    }

    // Closer to the full model on calibration-like text (and on the calibration text).
    let reference_calibration = logits(&full, &calibration);
    let heldout = sequences(12, 40);
    let reference_heldout = logits(&full, &heldout);
    for (seqs, reference) in [
        (&calibration, &reference_calibration),
        (&heldout, &reference_heldout),
    ] {
        let on = mean_squared_difference(&logits(&with, seqs), reference);
        let off = mean_squared_difference(&logits(&without, seqs), reference);
        // (Over seeds 4..12 compensation kept 1% to 15% of the error; half is a wide margin.)
        assert!(on < 0.5 * off, "compensated {on} vs uncompensated {off}");
    }
}

/// The model with one direction shared by every token embedding, as trained models' hidden
/// states share one (their anisotropy): projection inputs then have a clear mean, which is
/// what bias compensation restores.
fn anisotropic(mut model: Llama) -> Llama {
    let device = model.device();
    let [vocab, hidden] = model.embed_tokens.dims();
    let shared: Vec<f32> = (0..hidden)
        .map(|i| if i % 3 == 0 { 0.6 } else { -0.3 })
        .collect();
    let shared = Tensor::<2>::from_data(TensorData::new(shared, [1, hidden]), &device);
    let embed = model.embed_tokens.val() + shared.repeat_dim(0, vocab);
    model.embed_tokens = Param::from_tensor(embed);
    model
}

fn complement(kept: &[usize], len: usize) -> Vec<usize> {
    (0..len).filter(|i| !kept.contains(i)).collect()
}

/// A layer small enough to score by hand: hidden 3, four query heads over two key/value heads
/// of width 2 (so each unit owns four `o_proj` input channels), four FFN channels.
fn hand_layer(device: &Device) -> DecoderLayer {
    let linear = |d_in: usize, d_out: usize, salt: usize| {
        let values: Vec<f32> = (0..d_in * d_out)
            .map(|i| ((i * 7 + salt * 3) % 11) as f32 / 4.0 - 1.2)
            .collect();
        Linear {
            weight: Param::from_tensor(Tensor::from_data(
                TensorData::new(values, [d_in, d_out]),
                device,
            )),
            bias: None,
            adapter: None,
        }
    };
    DecoderLayer {
        input_norm: RmsNormConfig::new(3).init(device),
        attention: Attention {
            q_proj: linear(3, 8, 1),
            k_proj: linear(3, 4, 2),
            v_proj: linear(3, 4, 3),
            o_proj: linear(8, 3, 4),
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 2,
        },
        post_attention_norm: RmsNormConfig::new(3).init(device),
        mlp: Mlp {
            gate_proj: linear(3, 4, 5),
            up_proj: linear(3, 4, 6),
            down_proj: linear(4, 3, 7),
        },
    }
}

/// Statistics of `samples` (rows of `width` values), through Welford's update.
fn stats_of(samples: &[Vec<f64>]) -> ChannelStats {
    let mut stats = ChannelStats::new(samples[0].len());
    for s in samples {
        stats.push(s);
    }
    stats
}

/// Two-pass sample variance of each column.
fn variance(samples: &[Vec<f64>]) -> Vec<f64> {
    let n = samples.len() as f64;
    (0..samples[0].len())
        .map(|c| {
            let mean = samples.iter().map(|s| s[c]).sum::<f64>() / n;
            samples.iter().map(|s| (s[c] - mean).powi(2)).sum::<f64>() / (n - 1.0)
        })
        .collect()
}

fn samples(width: usize, salt: usize) -> Vec<Vec<f64>> {
    (0..5)
        .map(|t| {
            (0..width)
                .map(|c| (((t + 1) * (c + salt) * 13) % 17) as f64 / 5.0 + c as f64)
                .collect()
        })
        .collect()
}

#[test]
fn flap_scores_follow_the_formula_on_a_hand_built_layer() {
    let device = Device::flex();
    let layer = hand_layer(&device);
    let (o_samples, down_samples) = (samples(8, 1), samples(4, 2));
    let stats = LayerStats {
        o_proj: stats_of(&o_samples),
        down_proj: stats_of(&down_samples),
    };
    let row_norms = |linear: &Linear| -> Vec<f64> {
        let (d_in, d_out) = linear.dims();
        let w = host(linear.weight.val());
        (0..d_in)
            .map(|i| (0..d_out).map(|o| (w[i * d_out + o] as f64).powi(2)).sum())
            .collect()
    };
    let fluctuation = |samples: &[Vec<f64>], linear: &Linear| -> Vec<f64> {
        variance(samples)
            .iter()
            .zip(row_norms(linear))
            .map(|(v, n)| v * n)
            .collect()
    };
    let standardised = |s: &[f64]| -> Vec<f64> {
        let n = s.len() as f64;
        let mean = s.iter().sum::<f64>() / n;
        let std = (s.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt();
        s.iter().map(|x| (x - mean) / std).collect()
    };
    let o = fluctuation(&o_samples, &layer.attention.o_proj);
    let down = fluctuation(&down_samples, &layer.mlp.down_proj);
    let o_std = standardised(&o);
    // Key/value head 0 owns query heads 0, 1: o_proj inputs 0..4; head 1 inputs 4..8.
    let expected_heads = [
        o_std[..4].iter().sum::<f64>() / 4.0,
        o_std[4..].iter().sum::<f64>() / 4.0,
    ];
    let scores = layer_flap_scores(&layer, &stats);
    let close = |a: &[f64], b: &[f64]| {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            // Row norms are summed in f32 on the device.
            assert!((x - y).abs() < 1e-6 * (1.0 + y.abs()), "{a:?} vs {b:?}");
        }
    };
    close(&scores.kv_heads, &expected_heads);
    close(&scores.ffn_channels, &standardised(&down));
    close(
        &attention_fluctuation(&layer, &stats),
        &[o[..4].iter().sum(), o[4..].iter().sum()],
    );
    assert_eq!(standardise(&[2.0, 2.0]), vec![0.0, 0.0]);
    assert_eq!(standardise(&[5.0]), vec![0.0]);
}

#[test]
fn magnitude_follows_the_formula_on_a_hand_built_layer() {
    let device = Device::flex();
    let layer = hand_layer(&device);
    let squares = |linear: &Linear, axis: Axis, indices: &[usize]| -> f64 {
        let (d_in, d_out) = linear.dims();
        let w = host(linear.weight.val());
        let at = |i: usize, o: usize| (w[i * d_out + o] as f64).powi(2);
        indices
            .iter()
            .map(|&k| match axis {
                Axis::Rows => (0..d_out).map(|o| at(k, o)).sum::<f64>(),
                Axis::Columns => (0..d_in).map(|i| at(i, k)).sum::<f64>(),
            })
            .sum()
    };
    let a = &layer.attention;
    let heads: Vec<f64> = [(0..4).collect::<Vec<_>>(), (4..8).collect()]
        .iter()
        .zip([[0, 1], [2, 3]])
        .map(|(query, kv)| {
            (squares(&a.q_proj, Axis::Columns, query)
                + squares(&a.k_proj, Axis::Columns, &kv)
                + squares(&a.v_proj, Axis::Columns, &kv)
                + squares(&a.o_proj, Axis::Rows, query))
            .sqrt()
        })
        .collect();
    let m = &layer.mlp;
    let channels: Vec<f64> = (0..4)
        .map(|j| {
            (squares(&m.gate_proj, Axis::Columns, &[j])
                + squares(&m.up_proj, Axis::Columns, &[j])
                + squares(&m.down_proj, Axis::Rows, &[j]))
            .sqrt()
        })
        .collect();
    let scores = layer_magnitude(&layer);
    for (x, y) in scores
        .kv_heads
        .iter()
        .zip(&heads)
        .chain(scores.ffn_channels.iter().zip(&channels))
    {
        assert!((x - y).abs() < 1e-5 * y, "{x} vs {y}");
    }
    assert_eq!((scores.kv_heads.len(), scores.ffn_channels.len()), (2, 4));
}

#[test]
fn channel_statistics_merge_like_one_pass() {
    let all = samples(6, 3);
    let whole = stats_of(&all);
    let mut merged = stats_of(&all[..2]);
    merged.merge(&stats_of(&all[2..]));
    assert_eq!(merged.count, 5);
    for (a, b) in merged.variance().iter().zip(variance(&all)) {
        assert!((a - b).abs() < 1e-12 * (1.0 + b));
    }
    for (a, b) in merged.mean.iter().zip(&whole.mean) {
        assert!((a - b).abs() < 1e-12 * (1.0 + b.abs()));
    }
}

#[test]
fn calibration_counts_real_tokens_only_whatever_the_batching() {
    let full = model(5);
    let seqs = sequences(11, 5);
    let together = calibrate(&full, &seqs);
    let tokens: usize = seqs.iter().map(Vec::len).sum();
    assert_eq!(together.tokens(), tokens as u64);

    // One sequence at a time (no padding anywhere), merged.
    let mut apart = CalibrationStats::new(&full);
    for s in &seqs {
        let one = calibrate(&full, std::slice::from_ref(s));
        for (a, b) in apart.layers.iter_mut().zip(&one.layers) {
            a.o_proj.merge(&b.o_proj);
            a.down_proj.merge(&b.down_proj);
        }
    }
    // And by hand for one sequence, from the raw projection inputs.
    let first = &seqs[0];
    let mut raw: Vec<Vec<Vec<f64>>> = vec![Vec::new(); 2 * full.layers.len()];
    let ids = TokenBatch::right_padded(std::slice::from_ref(first), 0, &full.device()).ids;
    let mut observe = |layer: usize, which: ProjectionInput, input: &Tensor<3>| {
        let [_, seq, width] = input.dims();
        let v: Vec<f32> = input.clone().into_data().try_into_vec_as().unwrap();
        let slot = 2 * layer + (which == ProjectionInput::DownProj) as usize;
        raw[slot] = (0..seq)
            .map(|t| {
                v[t * width..(t + 1) * width]
                    .iter()
                    .map(|&x| x as f64)
                    .collect()
            })
            .collect();
    };
    let _ = full.hidden_observed(ids, None, None, Some(&mut observe));
    let alone = calibrate(&full, std::slice::from_ref(first));

    let close = |a: &[f64], b: &[f64], what: &str| {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-5 * (1.0 + y.abs()), "{what}: {x} vs {y}");
        }
    };
    for (l, (t, a)) in together.layers.iter().zip(&apart.layers).enumerate() {
        for (x, y, what) in [
            (&t.o_proj, &a.o_proj, "o_proj"),
            (&t.down_proj, &a.down_proj, "down_proj"),
        ] {
            assert_eq!(x.count, y.count);
            close(&x.mean, &y.mean, &format!("layer {l} {what} mean"));
            close(
                &x.variance(),
                &y.variance(),
                &format!("layer {l} {what} variance"),
            );
        }
        let by_hand = [&raw[2 * l], &raw[2 * l + 1]];
        let stats = [&alone.layers[l].o_proj, &alone.layers[l].down_proj];
        for (samples, stats) in by_hand.into_iter().zip(stats) {
            close(
                &stats.variance(),
                &variance(samples),
                &format!("layer {l} by hand"),
            );
            close(
                &stats.mean,
                &stats_of(samples).mean,
                &format!("layer {l} mean by hand"),
            );
        }
    }
}

#[test]
fn kept_records_map_pruned_tensors_back_to_full_coordinates() {
    let full = with_adapters(model(6));
    let plan = hand_plan();
    let (pruned, kept) = prune_model(full.clone(), &plan);
    let json = serde_json::to_string(&kept).unwrap();
    assert_eq!(serde_json::from_str::<Vec<KeptUnits>>(&json).unwrap(), kept);

    for ((before, after), kept) in full.layers.iter().zip(&pruned.layers).zip(&kept) {
        let cases = [
            (
                &before.attention.q_proj,
                &after.attention.q_proj,
                Axis::Columns,
                kept.query_columns(2, 8),
            ),
            (
                &before.attention.k_proj,
                &after.attention.k_proj,
                Axis::Columns,
                kept.kv_columns(8),
            ),
            (
                &before.attention.o_proj,
                &after.attention.o_proj,
                Axis::Rows,
                kept.query_columns(2, 8),
            ),
            (
                &before.mlp.up_proj,
                &after.mlp.up_proj,
                Axis::Columns,
                kept.ffn_channels.clone(),
            ),
            (
                &before.mlp.down_proj,
                &after.mlp.down_proj,
                Axis::Rows,
                kept.ffn_channels.clone(),
            ),
        ];
        for (before, after, axis, indices) in cases {
            let (full_shape, small_shape) = (before.weight.dims(), after.weight.dims());
            let full_len = match axis {
                Axis::Rows => full_shape[0],
                Axis::Columns => full_shape[1],
            };
            let small = host(after.weight.val());
            // The pruned weight is the kept part of the full one...
            assert_eq!(
                gather(&host(before.weight.val()), full_shape, axis, &indices),
                small
            );
            // ...and scattering it back then gathering again changes nothing.
            let back = scatter(&small, small_shape, axis, &indices, full_len);
            assert_eq!(back.len(), full_shape[0] * full_shape[1]);
            assert_eq!(gather(&back, full_shape, axis, &indices), small);
            // The adapter factor that lost the same units maps back the same way.
            let (a_before, a_after) = (
                before.adapter.as_ref().unwrap(),
                after.adapter.as_ref().unwrap(),
            );
            let (f_before, f_after) = match axis {
                Axis::Rows => (&a_before.a, &a_after.a),
                Axis::Columns => (&a_before.b, &a_after.b),
            };
            assert_eq!(
                gather(&host(f_before.val()), f_before.dims(), axis, &indices),
                host(f_after.val())
            );
        }
    }
}
