//! Instruction data as JSON Lines: one object per line with an instruction, an optional
//! context and a response (the Dolly-15k layout: `instruction`, `context`, `response`,
//! `category`), loaded into [`Example`]s whose loss covers the response only.
//!
//! Field names are configurable ([`InstructionFields`]) so Alpaca-style files (`instruction`,
//! `input`, `output`) load too. A bad line is an error naming its line number; blank lines are
//! skipped.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::example::{Example, render_instruction_prompt};

/// Which JSON fields hold what.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InstructionFields {
    /// The instruction (required, a non-empty string).
    pub instruction: String,
    /// The context (optional: absent, `null` or a string).
    pub context: String,
    /// The response (required, a non-empty string).
    pub response: String,
    /// The field used as the example's label for Dirichlet partitions, if any (optional per
    /// line: a line without it has no label).
    pub label: Option<String>,
    /// The field used as the example's key for the natural partition, if any (optional per
    /// line).
    pub key: Option<String>,
}

impl Default for InstructionFields {
    /// Dolly-15k's names, with `category` as the label and no key.
    fn default() -> Self {
        Self {
            instruction: "instruction".into(),
            context: "context".into(),
            response: "response".into(),
            label: Some("category".into()),
            key: None,
        }
    }
}

/// Why instruction data could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InstructionError {
    /// The file could not be read.
    #[error("reading {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A line is not a JSON object.
    #[error("line {line}: not a JSON object: {reason}")]
    NotAnObject {
        /// 1-based line number.
        line: usize,
        /// The parser's message, or what was found instead of an object.
        reason: String,
    },
    /// A required field is absent, or a field has the wrong type.
    #[error("line {line}: field `{field}` {problem}")]
    Field {
        /// 1-based line number.
        line: usize,
        /// The field's name.
        field: String,
        /// What is wrong (`is missing`, `is not a string`, `is empty`).
        problem: &'static str,
    },
}

/// Parses JSON Lines text into instruction examples, in file order.
pub fn parse_jsonl(
    text: &str,
    fields: &InstructionFields,
) -> Result<Vec<Example>, InstructionError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line_no = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let value: Value =
            serde_json::from_str(line).map_err(|e| InstructionError::NotAnObject {
                line: line_no,
                reason: e.to_string(),
            })?;
        let Value::Object(object) = value else {
            return Err(InstructionError::NotAnObject {
                line: line_no,
                reason: format!("found {}", kind(&value)),
            });
        };
        let field = |name: &str, required: bool| -> Result<Option<&str>, InstructionError> {
            let problem = match object.get(name) {
                Some(Value::String(s)) if required && s.trim().is_empty() => "is empty",
                Some(Value::String(s)) => return Ok(Some(s)),
                None | Some(Value::Null) if !required => return Ok(None),
                None | Some(Value::Null) => "is missing",
                Some(_) => "is not a string",
            };
            Err(InstructionError::Field {
                line: line_no,
                field: name.to_string(),
                problem,
            })
        };
        // Required fields are present by now, so the `unwrap_or_default`s never fire for them.
        let instruction = field(&fields.instruction, true)?.unwrap_or_default();
        let response = field(&fields.response, true)?.unwrap_or_default();
        let context = field(&fields.context, false)?.unwrap_or_default();
        let label = match &fields.label {
            Some(name) => field(name, false)?.map(str::to_string),
            None => None,
        };
        let key = match &fields.key {
            Some(name) => field(name, false)?.map(str::to_string),
            None => None,
        };
        out.push(Example {
            prompt: render_instruction_prompt(instruction, context),
            response: response.trim().to_string(),
            key,
            label,
        });
    }
    Ok(out)
}

/// Reads a JSON Lines file of instruction data (see [`parse_jsonl`]).
pub fn load_jsonl(
    path: &Path,
    fields: &InstructionFields,
) -> Result<Vec<Example>, InstructionError> {
    let text = std::fs::read_to_string(path).map_err(|source| InstructionError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_jsonl(&text, fields)
}

/// A JSON value's kind, for error messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dolly_lines_become_examples() {
        let text = concat!(
            r#"{"instruction": "Name a colour.", "context": "", "response": "Blue.", "category": "open_qa"}"#,
            "\n\n",
            r#"{"instruction": "Summarise.", "context": "Text.", "response": " Short. ", "category": "summarization"}"#,
            "\n",
            r#"{"instruction": "Why?", "response": "Because."}"#,
            "\n"
        );
        let examples = parse_jsonl(text, &InstructionFields::default()).unwrap();
        assert_eq!(examples.len(), 3);
        assert_eq!(
            examples[0].prompt,
            "### Instruction:\nName a colour.\n\n### Response:\n"
        );
        assert_eq!(examples[0].response, "Blue.");
        assert_eq!(examples[0].label.as_deref(), Some("open_qa"));
        assert!(examples[1].prompt.contains("### Context:\nText.\n"));
        assert_eq!(examples[1].response, "Short.");
        assert_eq!(examples[2].label, None);
        assert!(
            examples
                .iter()
                .all(|e| e.key.is_none() && e.is_instruction())
        );
    }

    #[test]
    fn alpaca_names_and_a_key_field() {
        let fields = InstructionFields {
            context: "input".into(),
            response: "output".into(),
            label: None,
            key: Some("user".into()),
            ..InstructionFields::default()
        };
        let text = r#"{"instruction": "Add.", "input": "1 and 2", "output": "3", "user": "u7"}"#;
        let examples = parse_jsonl(text, &fields).unwrap();
        assert_eq!(examples[0].key.as_deref(), Some("u7"));
        assert!(examples[0].prompt.contains("1 and 2"));
        assert_eq!(examples[0].response, "3");
    }

    #[test]
    fn bad_lines_name_their_line_number() {
        let fields = InstructionFields::default();
        let good = r#"{"instruction": "a", "response": "b"}"#;
        let cases = [
            (format!("{good}\n{{not json"), "line 2: not a JSON object"),
            (
                format!("{good}\n{good}\n[1, 2]"),
                "line 3: not a JSON object: found an array",
            ),
            (
                r#"{"response": "b"}"#.to_string(),
                "line 1: field `instruction` is missing",
            ),
            (
                r#"{"instruction": 3, "response": "b"}"#.to_string(),
                "line 1: field `instruction` is not a string",
            ),
            (
                format!("{good}\n{}", r#"{"instruction": "a", "response": "  "}"#),
                "line 2: field `response` is empty",
            ),
            (
                r#"{"instruction": "a", "response": "b", "category": 5}"#.to_string(),
                "line 1: field `category` is not a string",
            ),
        ];
        for (text, expected) in cases {
            let message = parse_jsonl(&text, &fields).unwrap_err().to_string();
            assert!(message.starts_with(expected), "{message:?} for {text:?}");
        }
    }
}
