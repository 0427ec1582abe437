//! The files a Hugging Face model folder keeps beside `tokenizer.json` that say how the
//! tokenizer is *used*: `tokenizer_config.json` (chat template, names of the BOS, EOS and pad
//! tokens) and `chat_template.jinja`, where recent transformers versions save the template.

use std::path::Path;

use serde::Deserialize;

use super::TokenizerError;

/// The parts of `tokenizer_config.json` / `chat_template.jinja` the tokenizer uses. Every field
/// is optional: a folder may have neither file.
#[derive(Debug, Default)]
pub(super) struct HfConfig {
    pub(super) chat_template: Option<String>,
    pub(super) bos_token: Option<String>,
    pub(super) eos_token: Option<String>,
    pub(super) pad_token: Option<String>,
}

/// `tokenizer_config.json` as written by transformers (unknown fields ignored).
#[derive(Deserialize)]
struct RawConfig {
    chat_template: Option<RawTemplate>,
    bos_token: Option<RawToken>,
    eos_token: Option<RawToken>,
    pad_token: Option<RawToken>,
}

/// A special token: a plain string, or a serialised `AddedToken` object.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawToken {
    Plain(String),
    Added { content: String },
}

/// A chat template: one string, or a list of named templates (transformers then uses the one
/// named `default` when no tools are passed, which fedtune never does).
#[derive(Deserialize)]
#[serde(untagged)]
enum RawTemplate {
    Single(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

impl RawToken {
    fn into_content(self) -> String {
        match self {
            Self::Plain(content) | Self::Added { content } => content,
        }
    }
}

impl HfConfig {
    /// Reads the files in `dir` that exist. A `chat_template.jinja` wins over the template in
    /// `tokenizer_config.json`, as it does in transformers.
    pub(super) fn read(dir: &Path) -> Result<Self, TokenizerError> {
        let config_path = dir.join("tokenizer_config.json");
        let mut config = match read_if_present(&config_path)? {
            None => Self::default(),
            Some(text) => {
                let raw: RawConfig =
                    serde_json::from_str(&text).map_err(|source| TokenizerError::Json {
                        path: config_path.clone(),
                        source,
                    })?;
                let chat_template = match raw.chat_template {
                    None => None,
                    Some(RawTemplate::Single(template)) => Some(template),
                    Some(RawTemplate::Named(templates)) => Some(
                        templates
                            .into_iter()
                            .find(|t| t.name == "default")
                            .map(|t| t.template)
                            .ok_or_else(|| TokenizerError::Malformed {
                                path: config_path.clone(),
                                reason: "named chat templates but none called `default`".into(),
                            })?,
                    ),
                };
                Self {
                    chat_template,
                    bos_token: raw.bos_token.map(RawToken::into_content),
                    eos_token: raw.eos_token.map(RawToken::into_content),
                    pad_token: raw.pad_token.map(RawToken::into_content),
                }
            }
        };
        if let Some(template) = read_if_present(&dir.join("chat_template.jinja"))? {
            config.chat_template = Some(template);
        }
        Ok(config)
    }
}

/// The file's text, or `None` when it does not exist.
fn read_if_present(path: &Path) -> Result<Option<String>, TokenizerError> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TokenizerError::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}
