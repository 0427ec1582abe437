//! Clients from a Shakespeare play: one per speaking role (LEAF's natural partition), every
//! fifth speech held out for evaluation (same voices, unseen lines).

use std::path::Path;

use anyhow::{Context, bail};
use fedtune_shared::data::shakespeare::by_role;
use fedtune_shared::tokenizer::Tokenizer;

/// The roles used as clients, their token sequences and the held-out sequences.
pub struct RoleClients {
    /// Role names, one per client.
    pub names: Vec<String>,
    /// Each client's training sequences.
    pub train: Vec<Vec<Vec<u32>>>,
    /// Held-out sequences of all clients.
    pub heldout: Vec<Vec<u32>>,
}

/// Reads `<texts>/<play>_gut.txt` and splits it into `clients` roles (those with the most
/// speeches), sequences cut to `seq_len` tokens, at most `heldout` held-out sequences.
pub fn role_clients(
    texts: &Path,
    play: &str,
    clients: usize,
    seq_len: usize,
    heldout: usize,
    tokenizer: &Tokenizer,
) -> anyhow::Result<RoleClients> {
    let path = texts.join(format!("{play}_gut.txt"));
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut roles: Vec<(String, Vec<String>)> = by_role(&text, 10).into_iter().collect();
    roles.sort_by_key(|(name, speeches)| (std::cmp::Reverse(speeches.len()), name.clone()));
    if roles.len() < clients {
        bail!(
            "{} has {} roles with 10 or more speeches; asked for {clients} clients",
            path.display(),
            roles.len()
        );
    }
    let mut out = RoleClients {
        names: Vec::new(),
        train: Vec::new(),
        heldout: Vec::new(),
    };
    for (name, speeches) in roles.into_iter().take(clients) {
        let mut train = Vec::new();
        for (i, speech) in speeches.iter().enumerate() {
            let mut ids = tokenizer.encode(speech)?;
            ids.truncate(seq_len);
            if ids.len() < 2 {
                continue;
            }
            if i % 5 == 4 {
                out.heldout.push(ids)
            } else {
                train.push(ids)
            }
        }
        out.names.push(name);
        out.train.push(train);
    }
    out.heldout.truncate(heldout);
    Ok(out)
}
