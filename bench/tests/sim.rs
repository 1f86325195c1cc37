//! `tandem-bench sim` end to end: a small closed-loop run with a capacity
//! search, its JSON report (ratios), Markdown, plots, and `report`
//! re-rendering it. A few seconds.

#[test]
fn sim_reports_ratios_plots_and_rerenders() {
    let dir = std::env::temp_dir().join(format!("tandem-bench-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // A CPU-like calibration (9 ms + 4 ms per token), so capacity is a few
    // devices and the search short.
    let calibration = dir.join("calibration.json");
    let (gram, moment) = ([[0.0f64; 5]; 5], [0.0f64; 5]);
    let profile = serde_json::json!({
        "label": "test profile: CPU-like, not measured",
        "measured": false,
        "calibration": { "coefficients": [9.0, 0.0, 4.0, 0.05, 0.0], "quantile": 0.9, "residual_ratios": [0.9, 1.0, 1.1], "gram": gram, "moment": moment }
    });
    std::fs::write(&calibration, profile.to_string()).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tandem-bench"))
        .args(["sim", "--devices", "2", "--duration-s", "5", "--max-new-tokens", "12", "--prompts", "chat", "--num-prompts", "3", "--capacity", "--json"])
        .arg("--calibration")
        .arg(&calibration)
        .arg("--out")
        .arg(&dir)
        .output()
        .expect("run tandem-bench");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["kind"], "sim");
    let header = report["header"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect::<Vec<_>>().join("\n");
    assert!(header.contains("test profile: CPU-like, not measured"), "the calibration must be named: {header}");
    let policies = report["policies"].as_array().expect("policies");
    assert_eq!(policies.len(), 3);
    for p in policies {
        let attainment = p["slo_attainment"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&attainment));
        assert!(p["capacity"]["load"].as_f64().unwrap() >= 2.0, "{}: two devices are within this server's capacity", p["policy"]);
    }
    for ratio in ["capacity_vs_centralized", "capacity_vs_sled", "goodput_vs_centralized", "goodput_vs_sled"] {
        assert!(report["ratios"][ratio].as_f64().unwrap() > 0.0, "{ratio}");
    }
    for plot in ["goodput_vs_load", "attainment_vs_load", "ttft_cdf", "tpot_cdf"] {
        for ext in ["svg", "png"] {
            let f = dir.join(format!("{plot}.{ext}"));
            assert!(std::fs::metadata(&f).map(|m| m.len() > 1000).unwrap_or(false), "{} missing or empty", f.display());
        }
    }
    let rendered = std::process::Command::new(env!("CARGO_BIN_EXE_tandem-bench")).arg("report").arg(dir.join("report.json")).output().unwrap();
    assert!(rendered.status.success(), "{}", String::from_utf8_lossy(&rendered.stderr));
    assert_eq!(String::from_utf8(rendered.stdout).unwrap(), std::fs::read_to_string(dir.join("report.md")).unwrap());
    let _ = std::fs::remove_dir_all(dir);
}
