#!/usr/bin/env bash
# The speculation controller's stop rules side by side: fixed k = 4, the
# confidence threshold, and the rejection predictor trained here on other
# prompts. Local verification (deterministic acceptance), draft layers:25,
# greedy, 96 tokens per prompt. Prints a Markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p tandem-edge
EDGE="${TANDEM_EDGE_BIN:-${CARGO_TARGET_DIR:-target}/release/tandem-edge}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export DRAFT="${DRAFT:-layers:25}"
TRAIN=(
    "Explain how a refrigerator works."
    "Write a Python function that merges two sorted lists."
    "What are the main causes of inflation?"
    "Write a bash script that counts the lines of every .txt file in a folder."
    "Describe the water cycle for a ten-year-old."
    "Write a JavaScript function that debounces another function."
)
TEST=(
    "Write a Python function that checks whether a number is prime."
    "Give three tips for learning a new language."
    "Write a SQL query that finds the ten most recent orders per customer."
    "Summarise the plot of Romeo and Juliet in three sentences."
)
run() { # controller draft-len prompt [flags]
    "$EDGE" generate --local --draft "$DRAFT" --max-new-tokens 96 --controller "$1" --draft-len "$2" --prompt "$3" --json "${@:4}"
}
echo "training the rejection predictor on ${#TRAIN[@]} prompts ..." >&2
for p in "${TRAIN[@]}"; do run fixed 6 "$p" --log-controller "$WORK/log.jsonl" >/dev/null; done
"$EDGE" controller train "$WORK/log.jsonl" -o "$WORK/weights.json" >&2
for c in fixed confidence:0.4 "predictor:$WORK/weights.json:0.5"; do
    for p in "${TEST[@]}"; do run "$c" 4 "$p"; done >"$WORK/$(echo "$c" | cut -d: -f1).jsonl"
done
python3 - "$WORK" <<'PY'
import json, sys
work = sys.argv[1]
import os
print("| stop rule (k_max 4, draft %s) | acceptance | tokens/round | wasted drafting | drafting | wall |" % os.environ.get("DRAFT", "layers:25"))
print("|---|---|---|---|---|---|")
for name, label in [("fixed", "fixed k = 4"), ("confidence", "confidence (top-1 ≥ 0.4)"), ("predictor", "trained predictor (τ = 0.5)")]:
    runs = [json.loads(l) for l in open(f"{work}/{name}.jsonl")]
    drafted = sum(r["drafted"] for r in runs); accepted = sum(r["accepted"] for r in runs)
    tokens = sum(len(r["tokens"]) - 1 for r in runs); rounds = sum(r["rounds"] for r in runs)
    wasted = sum(r["wasted_draft_ms"] for r in runs); draft = sum(r["draft_ms"] for r in runs); wall = sum(r["wall_ms"] for r in runs)
    print(f"| {label} | {100*accepted/drafted:.1f} % | {tokens/rounds:.2f} | {wasted/1e3:.2f} s ({100*wasted/draft:.0f} % of drafting) | {draft/1e3:.2f} s | {wall/1e3:.1f} s |")
PY
