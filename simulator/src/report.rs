//! Reports comparing runs (filled by the reporting work).
