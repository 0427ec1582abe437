//! Rouge-L, computed exactly as the `rouge` Python package (pltrdy/rouge 1.0.1) computes its
//! `rouge-l` scores with default settings, so that numbers reported here can be compared with
//! numbers reported by Python tooling.
//!
//! That package's Rouge-L is the *summary-level* union-LCS variant (Lin 2004, §3.2), over
//! word *types*:
//!
//! 1. A text is split into sentences at every `.`; empty pieces are dropped, and each piece's
//!    whitespace is collapsed (`" ".join(piece.split())`). A piece of only whitespace stays, as
//!    an empty sentence, whose single word is the empty string. No lower-casing, no stemming,
//!    no punctuation removal besides the periods.
//! 2. `m` is the number of *distinct* words of the reference, `n` of the hypothesis.
//! 3. For every reference sentence and every hypothesis sentence, one longest common
//!    subsequence is reconstructed from the usual DP table (backtracking from the end: take a
//!    match; else step up in the reference when that cell is strictly larger, else left). The
//!    *set* of words in all these subsequences is the union LCS; its size is `llcs`.
//! 4. `r = llcs / m`, `p = llcs / n`, `f = 2 p r / (p + r + 1e-8)`.
//!
//! The package raises `ValueError` when either text has no sentence (empty, or only periods);
//! [`rouge_l`] returns `None` there, and [`mean_rouge_l_f`] scores such a pair 0.

use std::collections::HashSet;

/// Rouge-L precision, recall and F of one hypothesis against one reference.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RougeL {
    /// F score: `2 p r / (p + r + 1e-8)` (the package's smoothing term).
    pub f: f64,
    /// Precision: union-LCS words over distinct hypothesis words.
    pub p: f64,
    /// Recall: union-LCS words over distinct reference words.
    pub r: f64,
}

/// Python's `str.isspace` for one character: Unicode White_Space plus the four ASCII
/// information separators (U+001C to U+001F), which Python also splits on.
fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// The package's sentences: split at `.`, empty pieces dropped, whitespace collapsed.
fn sentences(text: &str) -> Vec<String> {
    text.split('.')
        .filter(|piece| !piece.is_empty())
        .map(|piece| {
            piece
                .split(is_python_space)
                .filter(|w| !w.is_empty())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// A sentence's words, as Python's `sentence.split(" ")` gives them (an empty sentence is one
/// empty word).
fn words(sentence: &str) -> Vec<&str> {
    sentence.split(' ').collect()
}

/// Adds to `union` the words of the longest common subsequence of `x` (reference) and `y`
/// (hypothesis) that the package's backtracking finds.
fn add_lcs_words<'a>(x: &[&'a str], y: &[&str], union: &mut HashSet<&'a str>) {
    let (n, m) = (x.len(), y.len());
    let width = m + 1;
    let mut table = vec![0u32; (n + 1) * width];
    for i in 1..=n {
        for j in 1..=m {
            table[i * width + j] = if x[i - 1] == y[j - 1] {
                table[(i - 1) * width + j - 1] + 1
            } else {
                table[(i - 1) * width + j].max(table[i * width + j - 1])
            };
        }
    }
    // The package recurses; the same path, iteratively.
    let (mut i, mut j) = (n, m);
    while i > 0 && j > 0 {
        if x[i - 1] == y[j - 1] {
            union.insert(x[i - 1]);
            i -= 1;
            j -= 1;
        } else if table[(i - 1) * width + j] > table[i * width + j - 1] {
            i -= 1;
        } else {
            j -= 1;
        }
    }
}

/// Rouge-L of `hypothesis` against `reference` (see the module documentation), or `None` when
/// either has no sentence.
pub fn rouge_l(hypothesis: &str, reference: &str) -> Option<RougeL> {
    let hyp = sentences(hypothesis);
    let refs = sentences(reference);
    if hyp.is_empty() || refs.is_empty() {
        return None;
    }
    let hyp_words: Vec<Vec<&str>> = hyp.iter().map(|s| words(s)).collect();
    let ref_words: Vec<Vec<&str>> = refs.iter().map(|s| words(s)).collect();
    let distinct = |sentences: &[Vec<&str>]| {
        sentences
            .iter()
            .flatten()
            .copied()
            .collect::<HashSet<&str>>()
            .len()
    };
    let m = distinct(&ref_words) as f64;
    let n = distinct(&hyp_words) as f64;
    let mut union = HashSet::new();
    for r in &ref_words {
        for h in &hyp_words {
            add_lcs_words(r, h, &mut union);
        }
    }
    let llcs = union.len() as f64;
    let (r, p) = (llcs / m, llcs / n);
    let f = 2.0 * ((p * r) / (p + r + 1e-8));
    Some(RougeL { f, p, r })
}

/// Mean Rouge-L F over `(hypothesis, reference)` pairs, as the package's `avg=True` gives it,
/// except that a pair where either text has no sentence (an empty generation) scores 0 rather
/// than raising: a model that says nothing should not be flattered by skipping it. 0 for no
/// pairs.
pub fn mean_rouge_l_f<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> f64 {
    let (mut total, mut count) = (0.0, 0usize);
    for (hypothesis, reference) in pairs {
        total += rouge_l(hypothesis, reference).map_or(0.0, |s| s.f);
        count += 1;
    }
    if count == 0 {
        0.0
    } else {
        total / count as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn one_sentence_by_hand() {
        // hyp "the cat sat on the mat", ref "the cat is on the mat".
        // Distinct words: ref {the, cat, is, on, mat} = 5, hyp {the, cat, sat, on, mat} = 5.
        // LCS = "the cat on the mat", its words as a set {the, cat, on, mat} = 4.
        // r = 4/5, p = 4/5, f = 2 (0.64) / (1.6 + 1e-8) = 0.79999999500000003...
        let s = rouge_l("the cat sat on the mat", "the cat is on the mat").unwrap();
        assert!(close(s.r, 0.8) && close(s.p, 0.8));
        assert!(close(s.f, 2.0 * 0.64 / (1.6 + 1e-8)));
        assert!(close(s.f, 0.7999999950000002));
    }

    #[test]
    fn backtracking_picks_the_packages_lcs() {
        // hyp "police killed the gunman", ref "the gunman killed police": two LCSs of length 2
        // ("the gunman" and "killed police"); either gives a 2-word set, so llcs = 2,
        // m = n = 4, r = p = 0.5, f = 2 (0.25) / (1 + 1e-8).
        let s = rouge_l("police killed the gunman", "the gunman killed police").unwrap();
        assert!(close(s.r, 0.5) && close(s.p, 0.5));
        assert!(close(s.f, 0.5 / (1.0 + 1e-8)));
        // Which LCS is found matters when the two have different word sets:
        // ref x = [a, b], hyp y = [b, a]. Table: every prefix pair has LCS 1 except the
        // empty ones. At (2, 2): b != a; table[1][2] = 1 is not > table[2][1] = 1, so step
        // left to (2, 1): x[1] = b == y[0] = b, take "b". The union is {b}, not {a}; with
        // m = n = 2, r = p = 0.5 either way, but a third sentence shows the difference:
        // ref "a b. a", hyp "b a": sentence 1 gives {b}, sentence 2 ([a] vs [b, a]) gives
        // {a}; union {a, b} = 2; m = |{a, b}| = 2, n = 2: r = p = 1.
        let s = rouge_l("b a", "a b. a").unwrap();
        assert!(close(s.r, 1.0) && close(s.p, 1.0));
    }

    #[test]
    fn union_lcs_across_sentences_by_hand() {
        // Lin's example: ref r = w1 w2 w3 w4 w5, hyp c1 = w1 w2 w6 w7 w8, c2 = w1 w3 w8 w9 w5.
        // LCS(r, c1) = w1 w2, LCS(r, c2) = w1 w3 w5; union {w1, w2, w3, w5} = 4.
        // m = 5, n = |{w1, w2, w6, w7, w8, w3, w9, w5}| = 8.
        // r = 4/5 = 0.8, p = 4/8 = 0.5, f = 2 (0.4) / (1.3 + 1e-8) = 0.61538461065...
        let s = rouge_l("w1 w2 w6 w7 w8. w1 w3 w8 w9 w5", "w1 w2 w3 w4 w5").unwrap();
        assert!(close(s.r, 0.8) && close(s.p, 0.5));
        assert!(close(s.f, 0.8 / (1.3 + 1e-8)));
    }

    #[test]
    fn repeated_words_count_once() {
        // hyp "the the the": n = |{the}| = 1; ref "the cat": m = 2; LCS "the", llcs = 1.
        // r = 1/2, p = 1/1, f = 2 (0.5) / (1.5 + 1e-8) = 0.66666666222...
        let s = rouge_l("the the the", "the cat").unwrap();
        assert!(close(s.r, 0.5) && close(s.p, 1.0));
        assert!(close(s.f, 1.0 / (1.5 + 1e-8)));
    }

    #[test]
    fn empty_inputs() {
        // No sentence at all: the package raises; here `None`, and 0 in a mean.
        assert_eq!(rouge_l("", "a b"), None);
        assert_eq!(rouge_l("a b", "..."), None);
        // A whitespace-only piece is an empty sentence whose one word is "": hyp "Hello. ."
        // has sentences ["Hello", ""], n = |{Hello, ""}| = 2; ref "Hello": m = 1; llcs = 1.
        // r = 1, p = 1/2, f = 2 (0.5) / (1.5 + 1e-8).
        let s = rouge_l("Hello. .", "Hello").unwrap();
        assert!(close(s.r, 1.0) && close(s.p, 0.5));
        assert!(close(s.f, 1.0 / (1.5 + 1e-8)));
        // mean of 0.79999999500000003 (above) and 0 for the empty generation.
        let mean = mean_rouge_l_f([
            ("the cat sat on the mat", "the cat is on the mat"),
            ("", "anything"),
        ]);
        assert!(close(mean, 0.7999999950000002 / 2.0));
        assert_eq!(mean_rouge_l_f([]), 0.0);
    }

    #[test]
    fn whitespace_is_split_as_python_does() {
        // Tabs, newlines and U+001F separate words; "a\u{1f}b" is two words in Python.
        let s = rouge_l("a\tb\u{1f}c\nd", "a b c d").unwrap();
        assert!(close(s.r, 1.0) && close(s.p, 1.0));
    }

    /// Scores the `rouge` package itself gave (`shared/tests/data/rouge_l_reference.json`,
    /// made with `rouge==1.0.1`; the generating call is in the file): the four news pairs of
    /// the package's own test data plus edge cases. Matching to 1e-12 on all of them, long
    /// texts with abbreviations ("u.s.") that split sentences included.
    #[test]
    fn matches_the_python_package() {
        let json = include_str!("../../tests/data/rouge_l_reference.json");
        let reference: serde_json::Value = serde_json::from_str(json).unwrap();
        let cases = reference["cases"].as_array().unwrap();
        assert!(cases.len() >= 10);
        for case in cases {
            let (hyp, refr) = (case["hyp"].as_str().unwrap(), case["ref"].as_str().unwrap());
            let expected = &case["rouge_l"];
            let s = rouge_l(hyp, refr).unwrap();
            for (got, key) in [(s.f, "f"), (s.p, "p"), (s.r, "r")] {
                let want = expected[key].as_f64().unwrap();
                assert!(
                    close(got, want),
                    "{key}: {got} vs {want} for {hyp:?} / {refr:?}"
                );
            }
        }
    }
}
