//! The text side of a model: turning text into token ids and back, and a chat into the prompt
//! text the model was fine-tuned on.
//!
//! A [`Tokenizer`] comes either from a GGUF file's `tokenizer.ggml.*` metadata or from a Hugging
//! Face `tokenizer.json` and the files beside it. Either way it must reproduce, id for id, what
//! Hugging Face `tokenizers` gives for the same model: the fine-tuning data, the model's weights
//! and the evaluation all assume those ids.

mod chat_template;
mod gguf_vocab;
mod hf_config;

use std::path::{Path, PathBuf};

pub use chat_template::{ChatMessage, ChatTemplate};

use crate::checkpoint::GgufMetadata;
use crate::checkpoint::gguf::MetadataError;

/// Tokens that end an assistant turn in the common chat formats (ChatML, Llama 3, Phi-3).
const END_OF_TURN_TOKENS: [&str; 3] = ["<|im_end|>", "<|eot_id|>", "<|end|>"];

/// Why a tokenizer could not be built, or could not encode, decode or render a chat.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// A `tokenizer.ggml.*` metadata key is missing or has the wrong type.
    #[error("{}: {source}", path.display())]
    Metadata {
        /// The model file.
        path: PathBuf,
        /// Which key, and what is wrong with it.
        source: MetadataError,
    },
    /// The GGUF file's `tokenizer.ggml.model` is not one this module can rebuild.
    #[error(
        "{}: tokenizer model `{model}` (tokenizer.ggml.model) is not supported; only `gpt2` \
         (byte-level BPE) is",
        path.display()
    )]
    UnsupportedModel {
        /// The model file.
        path: PathBuf,
        /// The value of `tokenizer.ggml.model`.
        model: String,
    },
    /// The GGUF file's `tokenizer.ggml.pre` names a pre-tokenizer this module does not know.
    #[error(
        "{}: pre-tokenizer `{name}` (tokenizer.ggml.pre) is not supported; known: {}",
        path.display(),
        gguf_vocab::KNOWN_PRE_TOKENIZERS.join(", ")
    )]
    UnknownPreTokenizer {
        /// The model file.
        path: PathBuf,
        /// The value of `tokenizer.ggml.pre`.
        name: String,
    },
    /// Two metadata arrays that must pair up element for element have different lengths.
    #[error("{}: `{key}` has {found} entries but there are {expected} tokens", path.display())]
    LengthMismatch {
        /// The model file.
        path: PathBuf,
        /// The array that does not match `tokenizer.ggml.tokens`.
        key: String,
        /// The number of tokens.
        expected: usize,
        /// The array's length.
        found: usize,
    },
    /// The tokenizer data is well-typed but inconsistent (a bad merge, a duplicate token, a
    /// special-token id outside the vocabulary, ...).
    #[error("{}: {reason}", path.display())]
    Malformed {
        /// The file the data came from.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Hugging Face `tokenizers` rejected the vocabulary or the `tokenizer.json`.
    #[error("{}: cannot build the tokenizer: {source}", path.display())]
    Build {
        /// The file the tokenizer came from.
        path: PathBuf,
        /// The `tokenizers` error.
        source: tokenizers::Error,
    },
    /// A tokenizer file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// `tokenizer_config.json` is not the JSON expected.
    #[error("{}: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: serde_json::Error,
    },
    /// Encoding text failed inside `tokenizers`.
    #[error("cannot encode text: {0}")]
    Encode(#[source] tokenizers::Error),
    /// Decoding ids failed inside `tokenizers`.
    #[error("cannot decode ids: {0}")]
    Decode(#[source] tokenizers::Error),
    /// An id to decode is not in the vocabulary.
    #[error("token id {id} is not in the vocabulary ({vocab_size} ids)")]
    UnknownId {
        /// The id.
        id: u32,
        /// The tokenizer's [`Tokenizer::vocab_size`].
        vocab_size: usize,
    },
    /// The chat template does not parse, raised an exception, or failed while rendering.
    #[error("chat template: {0}")]
    Template(#[from] minijinja::Error),
}

/// A model's tokenizer: Hugging Face `tokenizers` underneath, plus the special tokens and chat
/// template that came with the model.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    vocab_size: usize,
    special: SpecialIds,
    chat_template: Option<ChatTemplate>,
}

/// The ids of the special tokens a model declares (each may be absent).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct SpecialIds {
    bos: Option<u32>,
    eos: Option<u32>,
    pad: Option<u32>,
}

impl Tokenizer {
    /// Rebuilds the tokenizer stored in a GGUF file's metadata (`tokenizer.ggml.model` = `gpt2`,
    /// byte-level BPE). `source` is the file the metadata came from; it only names the file in
    /// errors.
    pub fn from_gguf(meta: &GgufMetadata, source: &Path) -> Result<Self, TokenizerError> {
        let vocab = gguf_vocab::build(meta, source)?;
        Ok(Self::assemble(
            vocab.tokenizer,
            vocab.special,
            vocab.chat_template,
        ))
    }

    /// Loads a Hugging Face `tokenizer.json`. The `tokenizer_config.json` beside it, when
    /// present, supplies the chat template and the names of the BOS, EOS and padding tokens; a
    /// `chat_template.jinja` beside it (where recent transformers versions save the template)
    /// takes precedence for the template, as in transformers.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self, TokenizerError> {
        let bytes = std::fs::read(path).map_err(|source| TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let inner =
            tokenizers::Tokenizer::from_bytes(bytes).map_err(|source| TokenizerError::Build {
                path: path.to_path_buf(),
                source,
            })?;
        let config = hf_config::HfConfig::read(path.parent().unwrap_or(Path::new(".")))?;
        let id_of = |token: Option<&str>| -> Result<Option<u32>, TokenizerError> {
            token
                .map(|token| {
                    inner
                        .token_to_id(token)
                        .ok_or_else(|| TokenizerError::Malformed {
                            path: path.to_path_buf(),
                            reason: format!("special token `{token}` is not in the vocabulary"),
                        })
                })
                .transpose()
        };
        let special = SpecialIds {
            bos: id_of(config.bos_token.as_deref())?,
            eos: id_of(config.eos_token.as_deref())?,
            // Without a named pad token, a `tokenizer.json` may still carry padding settings.
            pad: id_of(config.pad_token.as_deref())?
                .or_else(|| inner.get_padding().map(|padding| padding.pad_id)),
        };
        Ok(Self::assemble(inner, special, config.chat_template))
    }

    /// Writes the tokenizer as a Hugging Face folder keeps it: `tokenizer.json`, and
    /// `tokenizer_config.json` naming the BOS, EOS and padding tokens and holding the chat
    /// template, so that [`from_tokenizer_json`](Self::from_tokenizer_json) on the folder gives
    /// back the same ids, special tokens and template, whether this tokenizer came from a
    /// `tokenizer.json` or from a GGUF file's metadata.
    pub fn save_to_folder(&self, dir: &Path) -> Result<(), TokenizerError> {
        let json_path = dir.join("tokenizer.json");
        let json = self
            .inner
            .to_string(false)
            .map_err(|source| TokenizerError::Build {
                path: json_path.clone(),
                source,
            })?;
        let token = |id: Option<u32>| id.and_then(|id| self.inner.id_to_token(id));
        let config = serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": token(self.special.bos),
            "eos_token": token(self.special.eos),
            "pad_token": token(self.special.pad),
            "chat_template": self.chat_template.as_ref().map(ChatTemplate::source),
        });
        let config_path = dir.join("tokenizer_config.json");
        let config =
            serde_json::to_string_pretty(&config).map_err(|source| TokenizerError::Json {
                path: config_path.clone(),
                source,
            })?;
        for (path, text) in [(json_path, json), (config_path, config)] {
            std::fs::write(&path, text).map_err(|source| TokenizerError::Io { path, source })?;
        }
        Ok(())
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        special: SpecialIds,
        chat_template: Option<String>,
    ) -> Self {
        // Added tokens can sit past the model's own vocabulary (Llama 3's specials do), so the
        // size is one past the largest id of either.
        let vocab_size = inner
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&max| max as usize + 1);
        let token = |id: Option<u32>| id.and_then(|id| inner.id_to_token(id));
        let chat_template = chat_template
            .map(|source| ChatTemplate::new(source, token(special.bos), token(special.eos)));
        Self {
            inner,
            vocab_size,
            special,
            chat_template,
        }
    }

    /// Token ids for `text`, with no special tokens added (no BOS). Special tokens written in
    /// the text, such as `<|im_start|>`, each become their single id, as Hugging Face's
    /// `tokenizer(text, add_special_tokens=False)` does.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(TokenizerError::Encode)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text for `ids`, special tokens included (Hugging Face's
    /// `decode(ids, skip_special_tokens=False)`). An id outside the vocabulary is an error.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        // `tokenizers` silently drops unknown ids; a model emitting one is a bug to surface.
        if let Some(&id) = ids.iter().find(|&&id| self.inner.id_to_token(id).is_none()) {
            return Err(TokenizerError::UnknownId {
                id,
                vocab_size: self.vocab_size,
            });
        }
        self.inner
            .decode(ids, false)
            .map_err(TokenizerError::Decode)
    }

    /// One past the largest token id (added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The beginning-of-sequence token, if the model declares one.
    pub fn bos_id(&self) -> Option<u32> {
        self.special.bos
    }

    /// The end-of-sequence token, if the model declares one.
    pub fn eos_id(&self) -> Option<u32> {
        self.special.eos
    }

    /// The padding token, if the model declares one.
    pub fn pad_id(&self) -> Option<u32> {
        self.special.pad
    }

    /// The id of a token given as it is written in the vocabulary (byte-level form for BPE,
    /// e.g. `Ġthe`), or of an added token such as `<|im_end|>`.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The vocabulary entry for `id` (byte-level form for BPE).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The ids that end a generated turn: EOS, plus `<|im_end|>`, `<|eot_id|>` and `<|end|>`
    /// where the vocabulary has them. Chat models often stop on a turn marker that is not
    /// their declared EOS.
    pub fn end_of_turn_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = self.special.eos.into_iter().collect();
        for id in END_OF_TURN_TOKENS
            .iter()
            .filter_map(|t| self.inner.token_to_id(t))
        {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        ids
    }

    /// The chat template the model ships, if any.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.chat_template.as_ref()
    }

    /// Renders `messages` into prompt text with the model's chat template, as transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` does. A model
    /// that ships no template gets ChatML ([`ChatTemplate::chatml`]), transformers' former
    /// default.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        match &self.chat_template {
            Some(template) => template.render(messages, add_generation_prompt),
            None => ChatTemplate::chatml().render(messages, add_generation_prompt),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Saves the tiny GGUF-built tokenizer as a `tokenizer.json` folder and loads it back.
    #[test]
    fn tokenizer_json_round_trip_with_config() {
        let dir = tempfile::tempdir().unwrap();
        let from_gguf = gguf_vocab::tests::tiny("smollm");
        let json = dir.path().join("tokenizer.json");
        from_gguf.inner.save(&json, false).unwrap();

        let bare = Tokenizer::from_tokenizer_json(&json).unwrap();
        assert_eq!((bare.bos_id(), bare.eos_id()), (None, None));
        assert!(bare.chat_template().is_none());

        let config = r#"{
            "bos_token": "<|im_start|>",
            "eos_token": {"content": "<|im_end|>", "lstrip": false, "special": true},
            "pad_token": null,
            "chat_template": "{{ eos_token }}",
            "model_max_length": 8192
        }"#;
        std::fs::write(dir.path().join("tokenizer_config.json"), config).unwrap();
        let tok = Tokenizer::from_tokenizer_json(&json).unwrap();
        let text = "<|im_start|>hello world!<|im_end|>";
        assert_eq!(tok.encode(text).unwrap(), from_gguf.encode(text).unwrap());
        assert_eq!(tok.decode(&tok.encode(text).unwrap()).unwrap(), text);
        assert_eq!(
            (tok.bos_id(), tok.eos_id(), tok.pad_id()),
            (Some(1), Some(2), None)
        );
        assert_eq!(tok.vocab_size(), from_gguf.vocab_size());
        assert_eq!(tok.apply_chat_template(&[], false).unwrap(), "<|im_end|>");

        std::fs::write(dir.path().join("chat_template.jinja"), "{{ bos_token }}\n").unwrap();
        let tok = Tokenizer::from_tokenizer_json(&json).unwrap();
        assert_eq!(tok.apply_chat_template(&[], false).unwrap(), "<|im_start|>");
    }

    /// A GGUF-built tokenizer saved to a folder loads back with the same ids, special tokens
    /// and chat template.
    #[test]
    fn a_saved_tokenizer_loads_back_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let from_gguf = gguf_vocab::tests::tiny("smollm");
        let template = ChatTemplate::new("{{ bos_token }}!", Some("<|im_start|>".into()), None);
        let original = Tokenizer {
            chat_template: Some(template),
            ..from_gguf
        };
        assert_eq!(
            (original.bos_id(), original.eos_id(), original.pad_id()),
            (Some(1), Some(2), Some(0))
        );
        original.save_to_folder(dir.path()).unwrap();
        let back = Tokenizer::from_tokenizer_json(&dir.path().join("tokenizer.json")).unwrap();
        let text = "<|im_start|>hello world 123!<|im_end|>";
        assert_eq!(back.encode(text).unwrap(), original.encode(text).unwrap());
        assert_eq!(back.special, original.special);
        assert_eq!(back.vocab_size(), original.vocab_size());
        assert_eq!(
            back.chat_template().map(ChatTemplate::source),
            Some("{{ bos_token }}!")
        );
        assert_eq!(
            back.apply_chat_template(&[], false).unwrap(),
            "<|im_start|>!"
        );
    }

    #[test]
    fn tokenizer_json_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("tokenizer.json");
        let err = Tokenizer::from_tokenizer_json(&json).unwrap_err();
        assert!(matches!(err, TokenizerError::Io { .. }), "{err}");

        std::fs::write(&json, "{}").unwrap();
        let err = Tokenizer::from_tokenizer_json(&json).unwrap_err();
        assert!(matches!(err, TokenizerError::Build { .. }), "{err}");
        assert!(err.to_string().contains("tokenizer.json"), "{err}");

        gguf_vocab::tests::tiny("gpt2")
            .inner
            .save(&json, false)
            .unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"bos_token": "<nope>"}"#,
        )
        .unwrap();
        let err = Tokenizer::from_tokenizer_json(&json).unwrap_err();
        assert!(matches!(err, TokenizerError::Malformed { .. }), "{err}");
    }
}
