//! LoRA training runs on wgpu as on the CPU: the same steps give the same losses and adapters,
//! up to float rounding. Skips without a wgpu adapter unless `FEDTUNE_REQUIRE_WGPU=1`.

use burn::tensor::Device;
use fedtune_shared::checkpoint::MemorySource;
use fedtune_shared::lora::attach::{adapter_weights, attach_fresh};
use fedtune_shared::lora::train::{LoraTrainer, TrainConfig, TrainExample};
use fedtune_shared::lora::{LoraConfig, LoraScaling, TargetModule};
use fedtune_shared::model::{Llama, LlamaConfig};
use fedtune_tests::wgpu_device;

fn train(device: &Device) -> (Vec<f32>, Vec<f32>) {
    let base = Llama::load(
        &MemorySource::random(LlamaConfig::tiny(), 4),
        &device.clone().autodiff(),
        |_, _| {},
    )
    .unwrap();
    let config = LoraConfig {
        rank: 4,
        scaling: LoraScaling {
            alpha: 8.0,
            rslora: false,
        },
        dropout: 0.0,
        targets: TargetModule::ALL.to_vec(),
    };
    let mut model = attach_fresh(base, &config, 1);
    let data: Vec<TrainExample> = (0..4u32)
        .map(|s| TrainExample {
            ids: (0..10).map(|i| (s * 5 + i * 3) % 40).collect(),
            prompt_len: 2,
        })
        .collect();
    let mut trainer = LoraTrainer::new(
        TrainConfig {
            lr: 1e-2,
            warmup_steps: 0,
            batch_size: 2,
            ..TrainConfig::default()
        },
        0,
    );
    let mut losses = Vec::new();
    for step in 0..5 {
        let batch = [data[step % 4].clone(), data[(step + 1) % 4].clone()];
        let loss;
        (model, loss) = trainer.step(model, &batch);
        losses.push(loss.unwrap());
    }
    let adapter = adapter_weights(&model, config.scaling).unwrap();
    let values = adapter.layers.values().flat_map(|f| f.b.clone()).collect();
    (losses, values)
}

#[test]
fn lora_steps_on_wgpu_match_the_cpu() {
    let Some(gpu) = wgpu_device() else { return };
    let (cpu_losses, cpu_b) = train(&Device::flex());
    let (gpu_losses, gpu_b) = train(&gpu);
    for (c, g) in cpu_losses.iter().zip(&gpu_losses) {
        assert!(
            (c - g).abs() < 1e-4 * c.abs(),
            "losses {cpu_losses:?} vs {gpu_losses:?}"
        );
    }
    assert!(
        cpu_losses.last() < cpu_losses.first(),
        "training lowers the loss"
    );
    let scale = cpu_b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let diff = cpu_b
        .iter()
        .zip(&gpu_b)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
        / scale;
    eprintln!(
        "cpu vs wgpu after 5 LoRA steps: losses {cpu_losses:?} / {gpu_losses:?}, B max relative difference {diff:.2e}"
    );
    assert!(diff < 1e-3, "adapters differ by {diff} relative");
}
