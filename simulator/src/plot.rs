//! Plots of runs (filled by the plotting work).
