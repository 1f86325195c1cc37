//! Benchmark harness: live runs against a real server and a discrete-event
//! simulator sharing the scheduler code. Filled in by the bench work.
