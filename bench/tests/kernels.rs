//! `tandem-bench kernels --json` end to end on the default model: every
//! pass shape and the trained draft's replayed rounds are reported. A
//! smoke run (one repetition); the figures come from full runs (README
//! "Kernels").

#[test]
fn kernels_reports_every_pass_and_the_trained_drafts_cost() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem-bench"))
        .args(["kernels", "--json", "--no-stock", "--repeats", "1"])
        .output()
        .expect("run tandem-bench");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let tokens: Vec<u64> = report["passes"].as_array().unwrap().iter().map(|p| p["tokens"].as_u64().unwrap()).collect();
    assert_eq!(tokens, [1, 2, 5, 8, 16, 32, 98]);
    for p in report["passes"].as_array().unwrap().iter().chain([&report["ragged"]]) {
        assert!(p["ms"].as_f64().unwrap() > 0.0 && p["stock_ms"].is_null(), "{p}");
    }
    // The headline ratio is the two rows' medians; the pairs come beside it.
    let (ragged, five) = (report["ragged"]["ms"].as_f64().unwrap(), report["passes"][2]["ms"].as_f64().unwrap());
    assert!((report["ragged_over_single5"].as_f64().unwrap() - ragged / five).abs() < 1e-9, "{report}");
    assert!(report["ragged_over_single5_paired"].as_f64().unwrap() > 0.0 && report["single5_after_ragged_ms"].as_f64().unwrap() > 0.0, "{report}");
    let draft = &report["trained_draft"];
    // Four prompts × 96 tokens of the target's output, at most six tokens a round.
    assert!(draft["rounds"].as_u64().unwrap() >= 4 * 96 / 6, "{draft}");
    assert!(draft["ms_per_drafted_token"].as_f64().unwrap() > 0.0 && draft["draft_over_target_step"].as_f64().unwrap() > 0.0, "{draft}");
    // The trained draft agrees with the target on held-out chat far more
    // than chance (about a fifth of drafts at k = 5 in full runs).
    assert!(draft["acceptance"].as_f64().unwrap() > 0.08, "{draft}");
}
