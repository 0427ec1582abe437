//! The same model on the CPU backend (burn-flex) and on wgpu gives the same logits.
//!
//! On a machine without a GPU, wgpu runs on Mesa's software Vulkan driver (lavapipe), which
//! `scripts/test` installs. Without any adapter the test skips with a message, unless
//! `FEDTUNE_REQUIRE_WGPU=1` (set by CI), where it fails.

use burn::tensor::{Device, Int, Tensor, TensorData};
use fedtune_shared::checkpoint::MemorySource;
use fedtune_shared::model::{Llama, LlamaConfig, TokenBatch};
use fedtune_tests::wgpu_device;

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let max_ref = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / max_ref
}

#[test]
fn cpu_and_wgpu_give_the_same_logits() {
    let Some(gpu) = wgpu_device() else { return };
    let cpu = Device::flex();
    let mut config = LlamaConfig::tiny();
    config.num_layers = 3;
    let source = MemorySource::random(config, 42);
    let on_cpu = Llama::load(&source, &cpu, |_, _| {}).unwrap();
    let on_gpu = Llama::load(&source, &gpu, |_, _| {}).unwrap();

    let ids: Vec<i64> = (0..12).map(|i| (i * 13 + 5) % 64).collect();
    let run = |model: &Llama, device: &Device| -> Vec<f32> {
        let input =
            Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [1, ids.len()]), device);
        model
            .forward(input, None)
            .into_data()
            .try_into_vec_as()
            .unwrap()
    };
    let diff = max_rel_diff(&run(&on_gpu, &gpu), &run(&on_cpu, &cpu));
    eprintln!("cpu vs wgpu: max relative logit difference {diff:.2e}");
    assert!(diff < 1e-4, "cpu and wgpu logits differ by {diff} relative");

    // A padded batch too: the masks travel through the same code on both devices.
    let rows = vec![vec![3u32, 9, 27, 17, 51], vec![8, 1]];
    let padded = |model: &Llama, device: &Device| -> Vec<f32> {
        model
            .forward_batch(&TokenBatch::right_padded(&rows, 0, device))
            .into_data()
            .try_into_vec_as()
            .unwrap()
    };
    let diff = max_rel_diff(&padded(&on_gpu, &gpu), &padded(&on_cpu, &cpu));
    assert!(
        diff < 1e-4,
        "padded batch: cpu and wgpu differ by {diff} relative"
    );
}
