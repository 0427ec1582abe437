//! Training data: corpora and how they are split among clients.

pub mod shakespeare;
