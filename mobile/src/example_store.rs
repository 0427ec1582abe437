//! The app's training examples, kept on the device in `examples.jsonl` in the data folder and
//! never uploaded: only model updates leave the phone. One JSON object a line, appended, so an
//! app killed mid-write loses at most the line it was writing (a torn last line is skipped on
//! reading).

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use fedtune_client::trainer::TrainingData;
use fedtune_shared::lora::train::TrainExample;
use fedtune_shared::tokenizer::{ChatMessage, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::error::FedtuneError;

/// The file's name in the data folder.
pub(crate) const EXAMPLES_FILE: &str = "examples.jsonl";

/// One stored example.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum StoredExample {
    /// Plain text: the model learns to continue it.
    Text {
        /// The text.
        text: String,
    },
    /// An instruction and the response the model should give (a chat turn).
    Instruction {
        /// What the user asks.
        instruction: String,
        /// What the model should answer.
        response: String,
    },
}

/// The append-only example file.
#[derive(Debug)]
pub(crate) struct ExampleStore {
    path: PathBuf,
    count: u64,
}

impl ExampleStore {
    /// Opens (or starts) the store in `data_dir`.
    pub(crate) fn open(data_dir: &Path) -> Result<Self, FedtuneError> {
        let path = data_dir.join(EXAMPLES_FILE);
        let count = read_examples(&path)?.len() as u64;
        Ok(Self { path, count })
    }

    /// Examples stored.
    pub(crate) fn count(&self) -> u64 {
        self.count
    }

    /// Appends one example and syncs it to disk.
    pub(crate) fn add(&mut self, example: &StoredExample) -> Result<u64, FedtuneError> {
        let storage = |e: std::io::Error| FedtuneError::Storage {
            reason: format!("{}: {e}", self.path.display()),
        };
        let mut line = serde_json::to_string(example).map_err(|e| FedtuneError::Storage {
            reason: e.to_string(),
        })?;
        line.push('\n');
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&self.path)
            .map_err(storage)?;
        // After a torn write the file ends mid-line: start a fresh line so this example is not
        // glued to the fragment (which reading skips).
        let len = file.metadata().map_err(storage)?.len();
        if len > 0 {
            let mut last = [0u8];
            file.seek(SeekFrom::Start(len - 1)).map_err(storage)?;
            file.read_exact(&mut last).map_err(storage)?;
            if last[0] != b'\n' {
                line.insert(0, '\n');
            }
        }
        file.write_all(line.as_bytes()).map_err(storage)?;
        file.sync_data().map_err(storage)?;
        self.count += 1;
        Ok(self.count)
    }

    /// Deletes every example.
    pub(crate) fn clear(&mut self) -> Result<(), FedtuneError> {
        match std::fs::remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(FedtuneError::Storage {
                    reason: format!("{}: {e}", self.path.display()),
                });
            }
        }
        self.count = 0;
        Ok(())
    }

    /// Every example, tokenized: text cut into sequences of `sequence_length` tokens (for
    /// FedKSeed and LoRA alike), instruction pairs rendered with the model's chat template
    /// (LoRA's loss then covers the response only; FedKSeed trains on the whole turn).
    pub(crate) fn training_data(
        &self,
        tokenizer: &Tokenizer,
        sequence_length: usize,
    ) -> Result<TrainingData, FedtuneError> {
        let model = |e: fedtune_shared::tokenizer::TokenizerError| FedtuneError::Model {
            reason: e.to_string(),
        };
        let mut data = TrainingData {
            pad_id: tokenizer.pad_id().or(tokenizer.eos_id()).unwrap_or(0),
            ..TrainingData::default()
        };
        for example in read_examples(&self.path)? {
            match example {
                StoredExample::Text { text } => {
                    let ids = tokenizer.encode(&text).map_err(model)?;
                    for chunk in ids.chunks(sequence_length).filter(|c| c.len() >= 2) {
                        data.sequences.push(chunk.to_vec());
                        data.examples.push(TrainExample::text(chunk.to_vec()));
                    }
                }
                StoredExample::Instruction {
                    instruction,
                    response,
                } => {
                    let user = [ChatMessage::new("user", instruction)];
                    let prompt = tokenizer.apply_chat_template(&user, true).map_err(model)?;
                    let full = tokenizer
                        .apply_chat_template(
                            &[user[0].clone(), ChatMessage::new("assistant", response)],
                            false,
                        )
                        .map_err(model)?;
                    let prompt_len = tokenizer.encode(&prompt).map_err(model)?.len();
                    let ids = tokenizer.encode(&full).map_err(model)?;
                    if ids.len() < 2 {
                        continue;
                    }
                    data.sequences.push(ids.clone());
                    data.examples.push(TrainExample {
                        ids,
                        prompt_len: prompt_len.min(ids_len_minus_one(&data)),
                    });
                }
            }
        }
        Ok(data)
    }
}

/// The last example's length less one: a prompt never swallows every target.
fn ids_len_minus_one(data: &TrainingData) -> usize {
    data.sequences.last().map_or(0, |s| s.len() - 1)
}

/// Reads the file; a missing file is an empty store, an unreadable line (a torn write) is
/// skipped with a warning.
fn read_examples(path: &Path) -> Result<Vec<StoredExample>, FedtuneError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(FedtuneError::Storage {
                reason: format!("{}: {e}", path.display()),
            });
        }
    };
    Ok(text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .filter_map(|line| match serde_json::from_str(line) {
            Ok(example) => Some(example),
            Err(e) => {
                tracing::warn!(error = %e, "skipping an unreadable training example");
                None
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn examples_survive_reopening_and_a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = ExampleStore::open(dir.path()).unwrap();
        assert_eq!(store.count(), 0);
        store
            .add(&StoredExample::Text {
                text: "to be or not".into(),
            })
            .unwrap();
        let instruction = StoredExample::Instruction {
            instruction: "greet".into(),
            response: "hello".into(),
        };
        assert_eq!(store.add(&instruction).unwrap(), 2);
        // An app killed mid-append leaves half a line.
        let path = dir.path().join(EXAMPLES_FILE);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"text\": \"cut").unwrap();
        let examples = read_examples(&path).unwrap();
        assert_eq!(examples.len(), 2);
        assert_eq!(examples[1], instruction);
        let mut reopened = ExampleStore::open(dir.path()).unwrap();
        assert_eq!(reopened.count(), 2);
        // The next example starts on a line of its own.
        let after = StoredExample::Text {
            text: "after the tear".into(),
        };
        assert_eq!(reopened.add(&after).unwrap(), 3);
        let examples = read_examples(&path).unwrap();
        assert_eq!(examples.len(), 3);
        assert_eq!(examples[2], after);
        store.clear().unwrap();
        assert_eq!(ExampleStore::open(dir.path()).unwrap().count(), 0);
    }
}
