//! The daemon's durable store on real files: reports at most once per (round, device), data
//! surviving a reopen, round retention, tokens, atomic checkpoints, and damaged files.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use fedtune_server::store::{DeviceKey, PutOutcome, Store, StoreError};
use tempfile::TempDir;

fn device(n: u8) -> DeviceKey {
    let mut id = [0u8; 16];
    id[0] = n;
    id[15] = 0xa5;
    id
}

fn open(dir: &Path) -> Store {
    Store::open(dir).expect("open store")
}

#[test]
fn open_creates_the_folder_the_database_and_the_checkpoint_folder() {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join("nested").join("store");
    let store = open(&dir);
    assert_eq!(store.dir(), dir);
    assert!(dir.join("store.redb").is_file());
    assert!(dir.join("checkpoints").is_dir());
    assert_eq!(store.state().unwrap(), None);
    assert!(store.devices().unwrap().is_empty());
    assert!(store.round_summaries().unwrap().is_empty());
    assert_eq!(store.latest_checkpoint().unwrap(), None);
    assert_eq!(store.report_count(0).unwrap(), 0);
}

#[test]
fn reports_are_kept_once_per_round_and_device_sorted_by_device() {
    let tmp = TempDir::new().unwrap();
    let store = open(tmp.path());
    // Inserted out of order: device 9 first.
    assert_eq!(
        store.put_report(7, device(9), b"nine").unwrap(),
        PutOutcome::Inserted
    );
    assert_eq!(
        store.put_report(7, device(2), b"two").unwrap(),
        PutOutcome::Inserted
    );
    // The same (round, device) again: Duplicate, and the first bytes stay.
    assert_eq!(
        store.put_report(7, device(9), b"other").unwrap(),
        PutOutcome::Duplicate
    );
    // The same device in another round is a different report.
    assert_eq!(
        store.put_report(8, device(9), b"next").unwrap(),
        PutOutcome::Inserted
    );

    assert_eq!(
        store.reports(7).unwrap(),
        vec![(device(2), b"two".to_vec()), (device(9), b"nine".to_vec())]
    );
    assert_eq!(
        store.reports(8).unwrap(),
        vec![(device(9), b"next".to_vec())]
    );
    assert!(store.reports(6).unwrap().is_empty());
    assert_eq!(store.report_count(7).unwrap(), 2);
    assert_eq!(store.report_count(8).unwrap(), 1);
    assert_eq!(store.report_count(9).unwrap(), 0);
}

#[test]
fn reports_at_the_edges_of_the_key_space_stay_in_their_round() {
    let tmp = TempDir::new().unwrap();
    let store = open(tmp.path());
    let (lo, hi) = ([0u8; 16], [0xffu8; 16]);
    for round in [0, 1, u64::MAX] {
        store.put_report(round, hi, b"hi").unwrap();
        store.put_report(round, lo, b"lo").unwrap();
    }
    for round in [0, 1, u64::MAX] {
        assert_eq!(
            store.reports(round).unwrap(),
            vec![(lo, b"lo".to_vec()), (hi, b"hi".to_vec())]
        );
    }
    // An empty report is a report.
    assert_eq!(store.put_report(2, lo, b"").unwrap(), PutOutcome::Inserted);
    assert_eq!(
        store.put_report(2, lo, b"x").unwrap(),
        PutOutcome::Duplicate
    );
    assert_eq!(store.reports(2).unwrap(), vec![(lo, Vec::new())]);
}

#[test]
fn concurrent_duplicates_are_inserted_exactly_once() {
    let tmp = TempDir::new().unwrap();
    let store = Arc::new(open(tmp.path()));
    let threads: Vec<_> = (0..8u8)
        .map(|i| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || store.put_report(3, device(1), &[i]).unwrap())
        })
        .collect();
    let outcomes: Vec<PutOutcome> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let inserted = outcomes
        .iter()
        .filter(|o| **o == PutOutcome::Inserted)
        .count();
    assert_eq!(inserted, 1, "{outcomes:?}");
    assert_eq!(store.report_count(3).unwrap(), 1);
}

#[test]
fn everything_survives_dropping_and_reopening_the_store() {
    let tmp = TempDir::new().unwrap();
    {
        let store = open(tmp.path());
        store.put_report(4, device(1), b"report").unwrap();
        store.put_state(b"state v1").unwrap();
        store.put_device(device(1), b"device one").unwrap();
        store.add_token([7; 32], 2).unwrap();
        store.put_meta("run_id", b"abc").unwrap();
        store.finish_round(3, b"summary 3", b"state v2", 5).unwrap();
        store.write_checkpoint(3, b"weights", 2).unwrap();
    }
    let store = open(tmp.path());
    assert_eq!(
        store.reports(4).unwrap(),
        vec![(device(1), b"report".to_vec())]
    );
    assert_eq!(store.state().unwrap().as_deref(), Some(&b"state v2"[..]));
    assert_eq!(
        store.device(device(1)).unwrap().as_deref(),
        Some(&b"device one"[..])
    );
    assert_eq!(store.meta("run_id").unwrap().as_deref(), Some(&b"abc"[..]));
    assert_eq!(
        store.round_summaries().unwrap(),
        vec![(3, b"summary 3".to_vec())]
    );
    let (round, path) = store.latest_checkpoint().unwrap().unwrap();
    assert_eq!(round, 3);
    assert_eq!(fs::read(path).unwrap(), b"weights");
    // The token kept its uses across the reopen: two, then none.
    assert!(store.consume_token([7; 32]).unwrap());
    assert!(store.consume_token([7; 32]).unwrap());
    assert!(!store.consume_token([7; 32]).unwrap());
    // Still a duplicate after the reopen.
    assert_eq!(
        store.put_report(4, device(1), b"again").unwrap(),
        PutOutcome::Duplicate
    );
}

#[test]
fn a_store_cannot_be_opened_twice_at_once() {
    let tmp = TempDir::new().unwrap();
    let _first = open(tmp.path());
    assert!(Store::open(tmp.path()).is_err());
}

#[test]
fn finish_round_keeps_recent_reports_and_replaces_the_state() {
    let tmp = TempDir::new().unwrap();
    let store = open(tmp.path());
    for round in 1..=5 {
        store.put_report(round, device(1), b"a").unwrap();
        store.put_report(round, device(2), b"b").unwrap();
    }
    store.put_state(b"start").unwrap();

    // keep 2 at round 3: rounds r with r + 2 <= 3 go, i.e. round 1.
    store.finish_round(3, b"s3", b"after 3", 2).unwrap();
    let counts =
        |store: &Store| -> Vec<usize> { (1..=5).map(|r| store.report_count(r).unwrap()).collect() };
    assert_eq!(counts(&store), [0, 2, 2, 2, 2]);
    assert_eq!(store.state().unwrap().as_deref(), Some(&b"after 3"[..]));

    // keep larger than the round: nothing goes.
    store.finish_round(1, b"s1", b"after 1", 10).unwrap();
    assert_eq!(counts(&store), [0, 2, 2, 2, 2]);
    assert_eq!(store.state().unwrap().as_deref(), Some(&b"after 1"[..]));

    // keep 1 at round 4: the finished round stays, older ones go.
    store.finish_round(4, b"s4", b"after 4", 1).unwrap();
    assert_eq!(counts(&store), [0, 0, 0, 2, 2]);

    // keep 0 deletes the finished round's reports too, and nothing newer.
    store
        .finish_round(4, b"s4 again", b"after 4 again", 0)
        .unwrap();
    assert_eq!(counts(&store), [0, 0, 0, 0, 2]);
    assert_eq!(store.reports(5).unwrap().len(), 2);

    // Summaries ascending whatever the order they were written in; round 4's replaced.
    assert_eq!(
        store.round_summaries().unwrap(),
        vec![
            (1, b"s1".to_vec()),
            (3, b"s3".to_vec()),
            (4, b"s4 again".to_vec())
        ]
    );
    assert_eq!(
        store.state().unwrap().as_deref(),
        Some(&b"after 4 again"[..])
    );

    // put_state alone replaces the state and leaves the summaries.
    store.put_state(b"restart").unwrap();
    assert_eq!(store.state().unwrap().as_deref(), Some(&b"restart"[..]));
    assert_eq!(store.round_summaries().unwrap().len(), 3);
}

#[test]
fn tokens_are_used_up_then_refused() {
    let tmp = TempDir::new().unwrap();
    let store = open(tmp.path());
    let (a, b, unknown) = ([1u8; 32], [2u8; 32], [3u8; 32]);
    store.add_token(a, 2).unwrap();
    store.add_token(b, 1).unwrap();

    assert!(!store.consume_token(unknown).unwrap());
    assert!(store.consume_token(a).unwrap());
    assert!(store.consume_token(b).unwrap());
    assert!(!store.consume_token(b).unwrap(), "b had one use");
    assert!(store.consume_token(a).unwrap());
    assert!(!store.consume_token(a).unwrap(), "a had two uses");
    assert!(!store.consume_token(a).unwrap());

    // Adding again sets the uses; adding with zero uses removes the token.
    store.add_token(a, 1).unwrap();
    store.add_token(b, 5).unwrap();
    store.add_token(b, 0).unwrap();
    assert!(!store.consume_token(b).unwrap());
    assert!(store.consume_token(a).unwrap());
    assert!(!store.consume_token(a).unwrap());
}

#[test]
fn devices_and_metadata_are_stored_and_replaced() {
    let tmp = TempDir::new().unwrap();
    let store = open(tmp.path());
    assert_eq!(store.device(device(3)).unwrap(), None);
    store.put_device(device(3), b"three").unwrap();
    store.put_device(device(1), b"one").unwrap();
    store.put_device(device(3), b"three v2").unwrap();
    assert_eq!(
        store.devices().unwrap(),
        vec![
            (device(1), b"one".to_vec()),
            (device(3), b"three v2".to_vec())
        ]
    );
    assert_eq!(
        store.device(device(1)).unwrap().as_deref(),
        Some(&b"one"[..])
    );

    assert_eq!(store.meta("run_id").unwrap(), None);
    store.put_meta("run_id", b"x").unwrap();
    store.put_meta("run_id", b"y").unwrap();
    store.put_meta("other", b"").unwrap();
    assert_eq!(store.meta("run_id").unwrap().as_deref(), Some(&b"y"[..]));
    assert_eq!(store.meta("other").unwrap().as_deref(), Some(&b""[..]));
}

fn checkpoint_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn checkpoints_keep_the_newest_and_leave_no_temporary_files() {
    let tmp = TempDir::new().unwrap();
    let store = open(tmp.path());
    for round in 1..=5u64 {
        let path = store
            .write_checkpoint(round, format!("weights {round}").as_bytes(), 2)
            .unwrap();
        assert_eq!(
            path,
            tmp.path().join(format!("checkpoints/round-{round:08}.bin"))
        );
    }
    assert_eq!(
        checkpoint_names(tmp.path()),
        ["round-00000004.bin", "round-00000005.bin"]
    );
    let (round, path) = store.latest_checkpoint().unwrap().unwrap();
    assert_eq!(round, 5);
    assert_eq!(fs::read(&path).unwrap(), b"weights 5");
    assert_eq!(
        fs::read(tmp.path().join("checkpoints/round-00000004.bin")).unwrap(),
        b"weights 4"
    );

    // Rewriting a round replaces its file atomically.
    store.write_checkpoint(5, b"weights 5 v2", 2).unwrap();
    assert_eq!(fs::read(&path).unwrap(), b"weights 5 v2");
    assert_eq!(checkpoint_names(tmp.path()).len(), 2);

    // keep 0 still keeps the checkpoint just written.
    store.write_checkpoint(6, b"weights 6", 0).unwrap();
    assert_eq!(checkpoint_names(tmp.path()), ["round-00000006.bin"]);

    // Rounds past eight digits sort by number, not by name.
    store.write_checkpoint(123_456_789, b"big", 3).unwrap();
    assert_eq!(store.latest_checkpoint().unwrap().unwrap().0, 123_456_789);
}

#[test]
fn stray_files_in_the_checkpoint_folder_are_ignored_and_unfinished_writes_removed() {
    let tmp = TempDir::new().unwrap();
    {
        let store = open(tmp.path());
        store.write_checkpoint(2, b"two", 5).unwrap();
    }
    let checkpoints = tmp.path().join("checkpoints");
    // What a crash in the middle of a checkpoint write leaves, and unrelated files.
    fs::write(checkpoints.join(".round-00000009.bin.1.0.tmp"), b"partial").unwrap();
    fs::write(checkpoints.join("round-x.bin"), b"?").unwrap();
    fs::write(checkpoints.join("notes.txt"), b"?").unwrap();
    fs::create_dir(checkpoints.join("round-00000010.bin")).unwrap();

    let store = open(tmp.path());
    assert_eq!(
        checkpoint_names(tmp.path()),
        [
            "notes.txt",
            "round-00000002.bin",
            "round-00000010.bin",
            "round-x.bin"
        ]
    );
    assert_eq!(store.latest_checkpoint().unwrap().unwrap().0, 2);
    store.write_checkpoint(3, b"three", 1).unwrap();
    assert_eq!(
        checkpoint_names(tmp.path()),
        [
            "notes.txt",
            "round-00000003.bin",
            "round-00000010.bin",
            "round-x.bin"
        ]
    );
}

#[test]
fn a_garbage_store_file_is_an_error_not_a_panic() {
    for len in [1usize, 100, 4096, 64 * 1024] {
        let tmp = TempDir::new().unwrap();
        let bytes: Vec<u8> = (0..len)
            .map(|i| u8::try_from(i * 131 % 251).unwrap() ^ 0x5a)
            .collect();
        fs::write(tmp.path().join("store.redb"), bytes).unwrap();
        match Store::open(tmp.path()) {
            Err(StoreError::Corrupt { what }) => assert!(!what.is_empty()),
            Err(other) => panic!("{len} garbage bytes: not reported as corrupt: {other}"),
            Ok(_) => panic!("{len} garbage bytes opened"),
        }
    }
}

#[test]
fn a_damaged_store_file_is_an_error_not_a_panic() {
    let tmp = TempDir::new().unwrap();
    {
        let store = open(tmp.path());
        for round in 0..50 {
            for d in 0..20 {
                store.put_report(round, device(d), &[d; 300]).unwrap();
            }
        }
    }
    let path = tmp.path().join("store.redb");
    let mut bytes = fs::read(&path).unwrap();
    assert!(bytes.len() > 64 * 1024, "{} bytes", bytes.len());
    // Overwrite everything after the first pages (the header stays valid).
    for (i, b) in bytes.iter_mut().enumerate().skip(8192) {
        *b = u8::try_from(i % 253).unwrap();
    }
    fs::write(&path, bytes).unwrap();
    match Store::open(tmp.path()) {
        Err(StoreError::Corrupt { what }) => assert!(!what.is_empty()),
        Err(other) => panic!("a damaged store: not reported as corrupt: {other}"),
        Ok(_) => panic!("a damaged store opened"),
    }
}

#[test]
fn errors_and_the_store_can_cross_threads() {
    fn send_sync<T: Send + Sync + 'static>() {}
    send_sync::<Store>();
    send_sync::<StoreError>();
    let error: Box<dyn std::error::Error + Send + Sync> = Box::new(StoreError::Corrupt {
        what: "token uses".into(),
    });
    assert_eq!(error.to_string(), "store data is corrupt: token uses");
}
