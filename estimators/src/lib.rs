//! Pure estimators for Tandem's scheduler: no clocks, no I/O; time is passed
//! in. Filled in by the WISP scheduling work (see DESIGN.md).
