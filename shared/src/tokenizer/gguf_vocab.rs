//! Rebuilding a byte-level BPE tokenizer (`tokenizer.ggml.model` = `gpt2`) from a GGUF file's
//! metadata, so that a model file alone is enough to tokenize exactly as its Hugging Face
//! `tokenizer.json` did.
//!
//! GGUF keeps the vocabulary, the merges and the token types, but only a *name* for the
//! pre-tokenizer (`tokenizer.ggml.pre`, written by llama.cpp's converter). Each name is mapped
//! here onto the pre-tokenizer of the original `tokenizer.json`; an unknown name is an error
//! rather than a guess, because a wrong pre-tokenizer still produces plausible ids.

use std::path::Path;

use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

use super::{SpecialIds, TokenizerError};
use crate::checkpoint::GgufMetadata;
use crate::checkpoint::gguf::MetadataError;

/// The `tokenizer.ggml.pre` values [`build`] understands.
pub(super) const KNOWN_PRE_TOKENIZERS: [&str; 5] =
    ["smollm", "starcoder", "gpt2", "default", "llama-bpe"];

/// Llama 3's split regex, from its `tokenizer.json`.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GGUF token types (llama.cpp's `llama_token_type`) that Hugging Face keeps as added tokens.
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// What [`build`] recovers from the metadata.
pub(super) struct GgufVocab {
    pub(super) tokenizer: tokenizers::Tokenizer,
    pub(super) special: SpecialIds,
    pub(super) chat_template: Option<String>,
}

/// The pre-tokenizers of the models whose `tokenizer.ggml.pre` names are supported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreTokenizer {
    /// SmolLM / StarCoder: every digit alone, then GPT-2's byte-level split.
    SmolLm,
    /// GPT-2's byte-level split.
    Gpt2,
    /// Llama 3: its own regex split, then byte-level mapping without GPT-2's regex.
    Llama3,
}

impl PreTokenizer {
    fn from_name(name: &str) -> Option<Self> {
        match name {
            "smollm" | "starcoder" => Some(Self::SmolLm),
            "gpt2" | "default" => Some(Self::Gpt2),
            "llama-bpe" => Some(Self::Llama3),
            _ => None,
        }
    }

    /// The pre-tokenizer as the model's `tokenizer.json` defines it. The prefix space comes
    /// only from `tokenizer.ggml.add_space_prefix`: SmolLM2's and Llama 3's `tokenizer.json`
    /// add none, and adding one for them changes the first token of every text.
    fn build(self, add_prefix_space: bool) -> tokenizers::Result<PreTokenizerWrapper> {
        let byte_level = |use_regex| ByteLevel::new(add_prefix_space, true, use_regex).into();
        Ok(match self {
            Self::SmolLm => Sequence::new(vec![Digits::new(true).into(), byte_level(true)]).into(),
            Self::Gpt2 => byte_level(true),
            Self::Llama3 => Sequence::new(vec![
                Split::new(
                    SplitPattern::Regex(LLAMA3_SPLIT.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )?
                .into(),
                byte_level(false),
            ])
            .into(),
        })
    }

    /// Llama 3's `tokenizer.json` looks a whole pre-token up in the vocabulary before merging.
    fn ignore_merges(self) -> bool {
        self == Self::Llama3
    }
}

/// Builds the tokenizer described by `meta`'s `tokenizer.*` keys; `path` names the file in
/// errors.
pub(super) fn build(meta: &GgufMetadata, path: &Path) -> Result<GgufVocab, TokenizerError> {
    let metadata = |source| TokenizerError::Metadata {
        path: path.to_path_buf(),
        source,
    };
    let malformed = |reason: String| TokenizerError::Malformed {
        path: path.to_path_buf(),
        reason,
    };

    let model = meta.str("tokenizer.ggml.model").map_err(metadata)?;
    if model != "gpt2" {
        return Err(TokenizerError::UnsupportedModel {
            path: path.to_path_buf(),
            model: model.to_string(),
        });
    }
    let tokens = meta.str_array("tokenizer.ggml.tokens").map_err(metadata)?;
    let types = meta
        .i64_array("tokenizer.ggml.token_type")
        .map_err(metadata)?;
    if types.len() != tokens.len() {
        return Err(TokenizerError::LengthMismatch {
            path: path.to_path_buf(),
            key: "tokenizer.ggml.token_type".into(),
            expected: tokens.len(),
            found: types.len(),
        });
    }
    let merges = meta
        .str_array("tokenizer.ggml.merges")
        .map_err(metadata)?
        .into_iter()
        .map(|merge| {
            split_merge(merge).ok_or_else(|| {
                malformed(format!(
                    "merge `{merge}` is not two tokens separated by a space"
                ))
            })
        })
        .collect::<Result<Merges, _>>()?;
    // Files converted before llama.cpp recorded pre-tokenizers lack the key; llama.cpp treats
    // them as `default`, and so does this.
    let pre_name = meta
        .optional("tokenizer.ggml.pre", GgufMetadata::str)
        .map_err(metadata)?
        .unwrap_or("default");
    let pre =
        PreTokenizer::from_name(pre_name).ok_or_else(|| TokenizerError::UnknownPreTokenizer {
            path: path.to_path_buf(),
            name: pre_name.to_string(),
        })?;
    let add_prefix_space = optional_bool(meta, "tokenizer.ggml.add_space_prefix")
        .map_err(metadata)?
        .unwrap_or(false);

    let mut vocab = Vocab::default();
    for (id, token) in tokens.iter().enumerate() {
        let id = u32::try_from(id)
            .map_err(|_| malformed(format!("{} tokens do not fit 32-bit ids", tokens.len())))?;
        if let Some(first) = vocab.insert((*token).to_string(), id) {
            return Err(malformed(format!(
                "token `{token}` appears twice (ids {first} and {id})"
            )));
        }
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(pre.ignore_merges())
        .build()
        .map_err(|source| build_error(path, source))?;

    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(
        pre.build(add_prefix_space)
            .map_err(|source| build_error(path, source))?,
    ));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, ty)| matches!(**ty, CONTROL | USER_DEFINED))
        .map(|(token, _)| AddedToken::from(*token, true))
        .collect();
    tokenizer.add_special_tokens(&added);

    let token_id = |key: &str| -> Result<Option<u32>, TokenizerError> {
        let Some(id) = meta.optional(key, GgufMetadata::usize).map_err(metadata)? else {
            return Ok(None);
        };
        match u32::try_from(id) {
            Ok(id32) if id < tokens.len() => Ok(Some(id32)),
            _ => Err(malformed(format!(
                "`{key}` = {id} is outside the {} tokens",
                tokens.len()
            ))),
        }
    };
    let special = SpecialIds {
        bos: token_id("tokenizer.ggml.bos_token_id")?,
        eos: token_id("tokenizer.ggml.eos_token_id")?,
        pad: token_id("tokenizer.ggml.padding_token_id")?,
    };
    let chat_template = meta
        .optional("tokenizer.chat_template", GgufMetadata::str)
        .map_err(metadata)?
        .map(str::to_string);
    Ok(GgufVocab {
        tokenizer,
        special,
        chat_template,
    })
}

/// Splits a GGUF merge `"a b"` into its two tokens. Like llama.cpp, the separator is the first
/// space after the first character, so that a token that is itself a space can be merged.
fn split_merge(merge: &str) -> Option<(String, String)> {
    let first_len = merge.chars().next()?.len_utf8();
    let at = first_len + merge[first_len..].find(' ')?;
    Some((merge[..at].to_string(), merge[at + 1..].to_string()))
}

/// An optional boolean key (the metadata type has no boolean accessor).
fn optional_bool(meta: &GgufMetadata, key: &str) -> Result<Option<bool>, MetadataError> {
    meta.get(key)
        .map(|value| {
            value.as_bool().ok_or_else(|| MetadataError::WrongType {
                key: key.to_string(),
                expected: "bool",
            })
        })
        .transpose()
}

fn build_error(path: &Path, source: tokenizers::Error) -> TokenizerError {
    TokenizerError::Build {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::checkpoint::MetadataValue;
    use crate::tokenizer::{ChatMessage, Tokenizer};

    /// A byte-level vocabulary just big enough to spell "hello world!" and "12", with ChatML's
    /// special tokens first, as SmolLM2 has them.
    const TOKENS: [&str; 24] = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "h",
        "e",
        "l",
        "o",
        "Ġ",
        "w",
        "r",
        "d",
        "1",
        "2",
        "!",
        "he",
        "ll",
        "hell",
        "hello",
        "Ġw",
        "or",
        "Ġwor",
        "Ġworl",
        "Ġworld",
        "12",
    ];
    const MERGES: [&str; 10] = [
        "h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d", "1 2",
    ];

    fn id(token: &str) -> u32 {
        TOKENS.iter().position(|t| *t == token).unwrap() as u32
    }

    fn strings(items: &[&str]) -> MetadataValue {
        MetadataValue::Array(
            items
                .iter()
                .map(|s| MetadataValue::String(s.to_string()))
                .collect(),
        )
    }

    /// The `tokenizer.*` entries of a GGUF file holding the tiny vocabulary.
    fn tiny_entries(pre: &str) -> Vec<(&'static str, MetadataValue)> {
        let types = TOKENS
            .iter()
            .map(|t| MetadataValue::I32(if t.starts_with("<|") { 3 } else { 1 }))
            .collect();
        vec![
            ("tokenizer.ggml.model", MetadataValue::String("gpt2".into())),
            ("tokenizer.ggml.pre", MetadataValue::String(pre.into())),
            ("tokenizer.ggml.tokens", strings(&TOKENS)),
            ("tokenizer.ggml.token_type", MetadataValue::Array(types)),
            ("tokenizer.ggml.merges", strings(&MERGES)),
            ("tokenizer.ggml.bos_token_id", MetadataValue::U32(1)),
            ("tokenizer.ggml.eos_token_id", MetadataValue::U32(2)),
            ("tokenizer.ggml.padding_token_id", MetadataValue::U32(0)),
            (
                "tokenizer.ggml.add_space_prefix",
                MetadataValue::Bool(false),
            ),
        ]
    }

    fn metadata(entries: Vec<(&'static str, MetadataValue)>) -> GgufMetadata {
        let mut meta = GgufMetadata::default();
        for (key, value) in entries {
            meta.insert(key, value);
        }
        meta
    }

    /// The tiny tokenizer with the given pre-tokenizer, rebuilt through the GGUF path.
    pub(in crate::tokenizer) fn tiny(pre: &str) -> Tokenizer {
        Tokenizer::from_gguf(&metadata(tiny_entries(pre)), Path::new("tiny.gguf")).unwrap()
    }

    fn build_error(meta: &GgufMetadata) -> TokenizerError {
        Tokenizer::from_gguf(meta, Path::new("tiny.gguf")).unwrap_err()
    }

    #[test]
    fn encodes_and_decodes_byte_level_bpe() {
        let tok = tiny("smollm");
        let ids = tok.encode("hello world!").unwrap();
        assert_eq!(ids, [id("hello"), id("Ġworld"), id("!")]);
        assert_eq!(tok.decode(&ids).unwrap(), "hello world!");
        assert_eq!(tok.encode("").unwrap(), Vec::<u32>::new());
        assert_eq!(tok.vocab_size(), TOKENS.len());
        assert_eq!(
            (tok.bos_id(), tok.eos_id(), tok.pad_id()),
            (Some(1), Some(2), Some(0))
        );
        assert_eq!(tok.token_to_id("Ġworld"), Some(id("Ġworld")));
        assert_eq!(tok.id_to_token(id("hell")).as_deref(), Some("hell"));
    }

    #[test]
    fn special_tokens_in_text_are_single_ids_and_decode_back() {
        let tok = tiny("smollm");
        let ids = tok.encode("<|im_start|>hello<|im_end|>").unwrap();
        assert_eq!(ids, [1, id("hello"), 2]);
        assert_eq!(tok.decode(&ids).unwrap(), "<|im_start|>hello<|im_end|>");
        // No BOS is added, and no prefix space: "hello" at the start is not "Ġhello".
        assert_eq!(tok.encode("hello").unwrap(), [id("hello")]);
    }

    #[test]
    fn smollm_splits_digits_but_gpt2_does_not() {
        assert_eq!(tiny("smollm").encode("12").unwrap(), [id("1"), id("2")]);
        assert_eq!(tiny("gpt2").encode("12").unwrap(), [id("12")]);
        assert_eq!(tiny("default").encode("12").unwrap(), [id("12")]);
    }

    #[test]
    fn llama_bpe_builds_and_encodes() {
        let tok = tiny("llama-bpe");
        let ids = tok.encode("hello world!12").unwrap();
        assert_eq!(ids, [id("hello"), id("Ġworld"), id("!"), id("12")]);
        assert_eq!(tok.decode(&ids).unwrap(), "hello world!12");
    }

    #[test]
    fn decoding_an_unknown_id_is_an_error() {
        let err = tiny("smollm").decode(&[id("h"), 24]).unwrap_err();
        assert!(
            matches!(
                err,
                TokenizerError::UnknownId {
                    id: 24,
                    vocab_size: 24
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn end_of_turn_ids_are_eos_and_turn_markers() {
        let tok = tiny("smollm");
        assert_eq!(tok.end_of_turn_ids(), [2]);
        let mut entries = tiny_entries("smollm");
        entries.retain(|(key, _)| *key != "tokenizer.ggml.eos_token_id");
        let tok = Tokenizer::from_gguf(&metadata(entries), Path::new("tiny.gguf")).unwrap();
        assert_eq!(tok.eos_id(), None);
        assert_eq!(tok.end_of_turn_ids(), [2]);
    }

    #[test]
    fn chat_falls_back_to_chatml_and_uses_a_shipped_template() {
        let messages = [ChatMessage::new("user", "hello")];
        let tok = tiny("smollm");
        assert!(tok.chat_template().is_none());
        assert_eq!(
            tok.apply_chat_template(&messages, true).unwrap(),
            "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
        );

        let mut meta = metadata(tiny_entries("smollm"));
        let template =
            "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}";
        meta.insert(
            "tokenizer.chat_template",
            MetadataValue::String(template.into()),
        );
        let tok = Tokenizer::from_gguf(&meta, Path::new("tiny.gguf")).unwrap();
        let shipped = tok.chat_template().unwrap();
        assert_eq!(shipped.source(), template);
        assert_eq!(shipped.bos_token(), Some("<|im_start|>"));
        assert_eq!(
            tok.apply_chat_template(&messages, false).unwrap(),
            "<|im_start|>hello<|im_end|>"
        );
    }

    #[test]
    fn missing_tokens_key_is_named() {
        let mut entries = tiny_entries("smollm");
        entries.retain(|(key, _)| *key != "tokenizer.ggml.tokens");
        let err = build_error(&metadata(entries));
        assert!(
            matches!(&err, TokenizerError::Metadata { source: MetadataError::Missing { key }, .. }
                if key == "tokenizer.ggml.tokens"),
            "{err}"
        );
        assert!(err.to_string().contains("tiny.gguf"), "{err}");
    }

    #[test]
    fn merges_that_are_not_strings_are_named() {
        let mut meta = metadata(tiny_entries("smollm"));
        meta.insert(
            "tokenizer.ggml.merges",
            MetadataValue::Array(vec![MetadataValue::I32(7)]),
        );
        let err = build_error(&meta);
        assert!(
            matches!(&err, TokenizerError::Metadata { source: MetadataError::WrongType { key, .. }, .. }
                if key == "tokenizer.ggml.merges"),
            "{err}"
        );
    }

    #[test]
    fn unknown_pre_tokenizer_is_refused() {
        let err = build_error(&metadata(tiny_entries("mystery")));
        assert!(
            matches!(&err, TokenizerError::UnknownPreTokenizer { name, .. } if name == "mystery"),
            "{err}"
        );
        let message = err.to_string();
        assert!(
            message.contains("tiny.gguf") && message.contains("`mystery`"),
            "{message}"
        );
    }

    #[test]
    fn token_type_of_the_wrong_length_is_refused() {
        let mut meta = metadata(tiny_entries("smollm"));
        let short = MetadataValue::Array(vec![MetadataValue::I32(1); TOKENS.len() - 1]);
        meta.insert("tokenizer.ggml.token_type", short);
        let err = build_error(&meta);
        assert!(
            matches!(&err, TokenizerError::LengthMismatch { key, expected: 24, found: 23, .. }
                if key == "tokenizer.ggml.token_type"),
            "{err}"
        );
    }

    #[test]
    fn inconsistent_vocabularies_are_refused() {
        let mut meta = metadata(tiny_entries("smollm"));
        meta.insert("tokenizer.ggml.merges", strings(&["h x"]));
        assert!(matches!(build_error(&meta), TokenizerError::Build { .. }));

        let mut meta = metadata(tiny_entries("smollm"));
        meta.insert("tokenizer.ggml.merges", strings(&["hello"]));
        assert!(matches!(
            build_error(&meta),
            TokenizerError::Malformed { .. }
        ));

        let mut meta = metadata(tiny_entries("smollm"));
        meta.insert("tokenizer.ggml.bos_token_id", MetadataValue::U32(24));
        assert!(matches!(
            build_error(&meta),
            TokenizerError::Malformed { .. }
        ));

        let mut meta = metadata(tiny_entries("smollm"));
        meta.insert(
            "tokenizer.ggml.model",
            MetadataValue::String("llama".into()),
        );
        assert!(matches!(
            build_error(&meta),
            TokenizerError::UnsupportedModel { .. }
        ));

        let mut duplicated = TOKENS;
        duplicated[23] = "he";
        let mut meta = metadata(tiny_entries("smollm"));
        meta.insert("tokenizer.ggml.tokens", strings(&duplicated));
        assert!(matches!(
            build_error(&meta),
            TokenizerError::Malformed { .. }
        ));
    }

    #[test]
    fn merges_split_at_the_first_space_after_the_first_char() {
        assert_eq!(split_merge("Ġ t"), Some(("Ġ".into(), "t".into())));
        assert_eq!(split_merge("  a"), Some((" ".into(), "a".into())));
        assert_eq!(split_merge("ab"), None);
        assert_eq!(split_merge(""), None);
    }
}
