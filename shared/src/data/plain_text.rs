//! Plain text as training data: a text split into paragraphs (blank-line separated), long
//! paragraphs cut into windows at word boundaries, one [`Example`] per piece with the loss on
//! all of it.
//!
//! Windows are measured in characters, not tokens, so splitting needs no tokenizer; the token
//! cap is applied later by [`super::example::tokenize`].

use std::path::{Path, PathBuf};

use super::example::Example;

/// Why a plain-text file could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlainTextError {
    /// The file could not be read.
    #[error("reading {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Splits `text` into paragraph examples of at most `max_chars` characters each (a single
/// word longer than that is kept whole). Whitespace-only paragraphs are dropped; lines inside a
/// paragraph keep their newlines.
///
/// # Panics
///
/// If `max_chars` is 0.
pub fn split_paragraphs(text: &str, max_chars: usize) -> Vec<Example> {
    assert!(max_chars > 0, "max_chars must be positive");
    let mut out = Vec::new();
    let mut paragraph: Vec<&str> = Vec::new();
    let mut flush = |paragraph: &mut Vec<&str>| {
        if !paragraph.is_empty() {
            for window in windows(&paragraph.join("\n"), max_chars) {
                out.push(Example::text(window));
            }
            paragraph.clear();
        }
    };
    for line in text.lines() {
        if line.trim().is_empty() {
            flush(&mut paragraph);
        } else {
            paragraph.push(line.trim_end());
        }
    }
    flush(&mut paragraph);
    out
}

/// Reads a UTF-8 text file and splits it with [`split_paragraphs`].
pub fn load_text(path: &Path, max_chars: usize) -> Result<Vec<Example>, PlainTextError> {
    let text = std::fs::read_to_string(path).map_err(|source| PlainTextError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(split_paragraphs(&text, max_chars))
}

/// `text` cut at whitespace into pieces of at most `max_chars` characters; the whitespace at a
/// cut is dropped.
fn windows(text: &str, max_chars: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while rest.chars().count() > max_chars {
        // The first `max_chars + 1` characters: a cut at the whitespace among them leaves at
        // most `max_chars` before it.
        let head_end = rest
            .char_indices()
            .nth(max_chars)
            .map_or(rest.len(), |(i, c)| i + c.len_utf8());
        // Cut at the last whitespace in the head, else after the first word.
        let cut = rest[..head_end]
            .rfind(char::is_whitespace)
            .filter(|&i| i > 0)
            .or_else(|| rest.find(char::is_whitespace))
            .unwrap_or(rest.len());
        out.push(rest[..cut].trim_end().to_string());
        rest = rest[cut..].trim_start();
    }
    if !rest.is_empty() {
        out.push(rest.to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paragraphs_and_windows() {
        let text = "First line\nsecond line.\n\n  \nalpha beta gamma delta\n\n\nend";
        let examples = split_paragraphs(text, 12);
        let texts: Vec<&str> = examples.iter().map(|e| e.response.as_str()).collect();
        assert_eq!(
            texts,
            vec![
                "First line",
                "second line.",
                "alpha beta",
                "gamma delta",
                "end"
            ]
        );
        assert!(
            examples
                .iter()
                .all(|e| !e.is_instruction() && e.key.is_none())
        );
        // A window that fits keeps its newline.
        assert_eq!(
            split_paragraphs(text, 100)[0].response,
            "First line\nsecond line."
        );
    }

    #[test]
    fn words_longer_than_a_window_stay_whole() {
        assert_eq!(windows("abcdefgh ij", 4), vec!["abcdefgh", "ij"]);
        assert_eq!(windows("ab cd", 2), vec!["ab", "cd"]);
        assert_eq!(windows("ééé éé", 3), vec!["ééé", "éé"]);
    }
}
