//! Loader tests on small GGUF and safetensors files written here: dequantisation against an
//! independent reference, malformed files, and checkpoints that must reproduce a model exactly.

use burn::tensor::{Device, Int, Tensor, TensorData};
use fedtune_shared::checkpoint::export::{write_gguf, write_hf_folder};
use fedtune_shared::checkpoint::{
    CheckpointError, GgmlType, GgufFile, GgufMetadata, GgufSource, GgufWriter, HfFolder,
    LayerTensor, LlamaTensor, MemorySource, MetadataValue,
};
use fedtune_shared::model::{Llama, LlamaConfig};
use half::{bf16, f16};

/// Writes one tensor of raw bytes to a GGUF file and reads it back as f32.
fn roundtrip_raw(
    shape: &[usize],
    type_id: u32,
    bytes: Vec<u8>,
) -> Result<(Vec<usize>, Vec<f32>), CheckpointError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.gguf");
    GgufWriter::new()
        .raw_tensor("t", shape, type_id, bytes)
        .write(&path)
        .unwrap();
    GgufFile::open(&path)?.tensor_f32("t")
}

// The expected values below are computed from ggml's block definitions directly, not through
// fedtune's dequantiser: block = scale(s) as f16, then packed integers.

#[test]
fn plain_float_types_dequantise_exactly() {
    let values: Vec<f32> = (0..64).map(|i| (i as f32 - 20.0) * 0.125).collect();
    let f32_bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(
        roundtrip_raw(&[2, 32], 0, f32_bytes).unwrap(),
        (vec![2, 32], values.clone())
    );

    // Multiples of 1/8 in this range are exact in f16 and bf16.
    let f16_bytes = values
        .iter()
        .flat_map(|v| f16::from_f32(*v).to_le_bytes())
        .collect();
    assert_eq!(roundtrip_raw(&[64], 1, f16_bytes).unwrap().1, values);
    let bf16_bytes = values
        .iter()
        .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
        .collect();
    assert_eq!(
        roundtrip_raw(&[4, 16], 30, bf16_bytes).unwrap(),
        (vec![4, 16], values)
    );
}

#[test]
fn q8_0_dequantises_to_q_times_d() {
    let mut bytes = Vec::new();
    let mut expected = Vec::new();
    for (block, d) in [(0, 0.5f32), (1, -0.03125)] {
        bytes.extend_from_slice(&f16::from_f32(d).to_le_bytes());
        for j in 0..32i32 {
            let q = (j * 8 - 128 + block) as i8;
            bytes.push(q as u8);
            expected.push(q as f32 * d);
        }
    }
    assert_eq!(roundtrip_raw(&[64], 8, bytes).unwrap().1, expected);
}

#[test]
fn q4_0_and_q4_1_dequantise_nibbles_low_half_first() {
    // Byte j holds element j in its low nibble and element j + 16 in its high nibble.
    let nibble = |k: usize| ((k * 5 + 3) % 16) as u8;
    let packed: Vec<u8> = (0..16).map(|j| nibble(j) | (nibble(j + 16) << 4)).collect();

    let d = 0.25f32;
    let mut q4_0 = f16::from_f32(d).to_le_bytes().to_vec();
    q4_0.extend_from_slice(&packed);
    let expected: Vec<f32> = (0..32).map(|k| (nibble(k) as f32 - 8.0) * d).collect();
    assert_eq!(roundtrip_raw(&[32], 2, q4_0).unwrap().1, expected);

    let (d, m) = (0.5f32, -1.75f32);
    let mut q4_1 = f16::from_f32(d).to_le_bytes().to_vec();
    q4_1.extend_from_slice(&f16::from_f32(m).to_le_bytes());
    q4_1.extend_from_slice(&packed);
    let expected: Vec<f32> = (0..32).map(|k| nibble(k) as f32 * d + m).collect();
    assert_eq!(roundtrip_raw(&[32], 3, q4_1).unwrap().1, expected);
}

#[test]
fn q5_0_and_q5_1_add_the_fifth_bit_from_qh() {
    // Element k's fifth bit is bit k of the 32-bit `qh`; its low four bits are packed as in Q4.
    let nibble = |k: usize| ((k * 7 + 1) % 16) as u8;
    let qh: u32 = 0b1011_0010_0110_1100_1001_0111_0001_1010;
    let q = |k: usize| nibble(k) as i32 | (((qh >> k) & 1) as i32) << 4;
    let packed: Vec<u8> = (0..16).map(|j| nibble(j) | (nibble(j + 16) << 4)).collect();

    let d = 0.125f32;
    let mut q5_0 = f16::from_f32(d).to_le_bytes().to_vec();
    q5_0.extend_from_slice(&qh.to_le_bytes());
    q5_0.extend_from_slice(&packed);
    let expected: Vec<f32> = (0..32).map(|k| (q(k) - 16) as f32 * d).collect();
    assert_eq!(roundtrip_raw(&[32], 6, q5_0).unwrap().1, expected);

    let (d, m) = (0.25f32, 1.5f32);
    let mut q5_1 = f16::from_f32(d).to_le_bytes().to_vec();
    q5_1.extend_from_slice(&f16::from_f32(m).to_le_bytes());
    q5_1.extend_from_slice(&qh.to_le_bytes());
    q5_1.extend_from_slice(&packed);
    let expected: Vec<f32> = (0..32).map(|k| q(k) as f32 * d + m).collect();
    assert_eq!(roundtrip_raw(&[32], 7, q5_1).unwrap().1, expected);
}

fn tiny_gguf_bytes() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.metadata("general.name", MetadataValue::String("tiny".into()));
    w.tensor("a", &[2, 32], GgmlType::Q8_0, &[0.5; 64]);
    w.tensor("b", &[32], GgmlType::F32, &[1.0; 32]);
    w.to_bytes()
}

fn open_bytes(bytes: &[u8]) -> Result<GgufFile, CheckpointError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    std::fs::write(&path, bytes).unwrap();
    GgufFile::open(&path)
}

#[test]
fn truncated_file_names_file_and_tensor() {
    let bytes = tiny_gguf_bytes();
    let err = open_bytes(&bytes[..bytes.len() - 10]).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, CheckpointError::BadTensor { ref tensor, .. } if tensor == "b"),
        "{msg}"
    );
    assert!(
        msg.contains("bad.gguf") && msg.contains("truncated"),
        "{msg}"
    );

    // Cut inside the header: still an error, never a panic.
    for len in [0, 3, 10, 30, 60] {
        let err = open_bytes(&bytes[..len]).unwrap_err();
        assert!(err.to_string().contains("bad.gguf"), "{err}");
    }
}

#[test]
fn wrong_magic_is_reported() {
    let mut bytes = tiny_gguf_bytes();
    bytes[..4].copy_from_slice(b"GGML");
    let err = open_bytes(&bytes).unwrap_err();
    assert!(matches!(err, CheckpointError::BadMagic { .. }), "{err}");
    assert!(err.to_string().contains("not a GGUF file"), "{err}");
}

#[test]
fn unknown_tensor_type_names_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("k.gguf");
    // Type 12 is Q4_K, which fedtune does not read.
    GgufWriter::new()
        .raw_tensor("blk.0.attn_q.weight", &[256], 12, vec![0; 144])
        .write(&path)
        .unwrap();
    let err = GgufFile::open(&path).unwrap_err().to_string();
    assert!(
        err.contains("k.gguf") && err.contains("blk.0.attn_q.weight") && err.contains("type 12"),
        "{err}"
    );
}

#[test]
fn forged_lengths_are_rejected_without_allocating() {
    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&0u64.to_le_bytes()); // tensors
    bytes.extend_from_slice(&1u64.to_le_bytes()); // one metadata entry
    bytes.extend_from_slice(&u64::MAX.to_le_bytes()); // key length: forged
    let err = open_bytes(&bytes).unwrap_err();
    assert!(matches!(err, CheckpointError::Malformed { .. }), "{err}");

    let mut bytes = b"GGUF".to_vec();
    bytes.extend_from_slice(&3u32.to_le_bytes());
    bytes.extend_from_slice(&(1u64 << 40).to_le_bytes()); // absurd tensor count
    bytes.extend_from_slice(&0u64.to_le_bytes());
    assert!(open_bytes(&bytes).is_err());
}

fn logits(model: &Llama, ids: &[i64]) -> Vec<f32> {
    let device = model.device();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), &device);
    model
        .forward(ids, None)
        .into_data()
        .try_into_vec_as()
        .unwrap()
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let max_ref = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    a.iter()
        .zip(b)
        .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()))
        / max_ref
}

const IDS: [i64; 7] = [1, 5, 9, 3, 60, 2, 17];

#[test]
fn gguf_export_reloads_to_the_same_model() {
    let device = Device::flex();
    let source = MemorySource::random(LlamaConfig::tiny(), 7);
    let reference = logits(&Llama::load(&source, &device, |_, _| {}).unwrap(), &IDS);

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    write_gguf(&source, GgmlType::F32, &GgufMetadata::default(), &path).unwrap();
    let gguf = GgufSource::open(&path).unwrap();
    assert_eq!(gguf_config(&gguf), LlamaConfig::tiny());
    let reloaded = logits(&Llama::load(&gguf, &device, |_, _| {}).unwrap(), &IDS);
    assert_eq!(
        reloaded, reference,
        "F32 GGUF (with llama.cpp's q/k permutation) is lossless"
    );

    // Quantised weights move the logits a little, not a lot.
    write_gguf(&source, GgmlType::Q8_0, &GgufMetadata::default(), &path).unwrap();
    let q8 = logits(
        &Llama::load(&GgufSource::open(&path).unwrap(), &device, |_, _| {}).unwrap(),
        &IDS,
    );
    let diff = max_rel_diff(&q8, &reference);
    assert!(diff > 0.0 && diff < 0.05, "Q8_0 relative difference {diff}");
}

fn gguf_config(source: &GgufSource) -> LlamaConfig {
    use fedtune_shared::checkpoint::WeightSource;
    source.config().clone()
}

#[test]
fn shape_disagreeing_with_config_names_the_tensor() {
    let config = LlamaConfig::tiny();
    let mut source = MemorySource::random(config.clone(), 1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad_shape.gguf");
    // Claim more heads than the q_proj rows provide: the file and config disagree.
    let mut extra = GgufMetadata::default();
    extra.insert("llama.attention.head_count", MetadataValue::U32(8));
    extra.insert("llama.attention.head_count_kv", MetadataValue::U32(4));
    write_gguf(&source, GgmlType::F32, &extra, &path).unwrap_or_else(|e| panic!("{e}"));
    let gguf = GgufSource::open(&path).unwrap();
    let err = Llama::load(&gguf, &Device::flex(), |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("bad_shape.gguf")
            && err.contains("blk.0.attn_q.weight")
            && err.contains("disagrees"),
        "{err}"
    );

    // A non-finite weight is refused too.
    source.insert(
        LlamaTensor::Layer(1, LayerTensor::Up),
        vec![f32::NAN; 48 * 32],
    );
    let err = Llama::load(&source, &Device::flex(), |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.1.mlp.up_proj.weight") && err.contains("not finite"),
        "{err}"
    );
}

#[test]
fn hf_folder_reloads_to_the_same_model() {
    let device = Device::flex();
    let mut config = LlamaConfig::tiny();
    config.tie_word_embeddings = false;
    let source = MemorySource::random(config.clone(), 11);
    let reference = logits(&Llama::load(&source, &device, |_, _| {}).unwrap(), &IDS);

    let dir = tempfile::tempdir().unwrap();
    write_hf_folder(&source, dir.path()).unwrap();
    let folder = HfFolder::open(dir.path()).unwrap();
    let reloaded = logits(&Llama::load(&folder, &device, |_, _| {}).unwrap(), &IDS);
    assert_eq!(reloaded, reference);

    // A config.json that is not a Llama is refused with the file's name.
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "bert"}"#).unwrap();
    let err = HfFolder::open(dir.path()).unwrap_err().to_string();
    assert!(err.contains("config.json"), "{err}");
}
