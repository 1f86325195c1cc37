#!/usr/bin/env bash
# Draft sources side by side, end to end: `tandem-edge generate --local`
# at k = 5 (fixed), greedy, 96 tokens, on held-out prompts (the 12 bench
# chat requests and 6 HumanEval prompts, none seen in the trained draft's
# training). Prints a Markdown table: acceptance, tokens per round, the
# draft's milliseconds per drafted token and that as a fraction of the
# target's own milliseconds per token (plain decoding, same run), the
# speed-up of generation over plain decoding (milliseconds per token after
# the first), and whether every output equals plain decoding.
# EXTRA_ARGS go to every generate call (e.g. EXTRA_ARGS=--adaptive-k: k
# is then at most 5, picked each round from measured costs).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p tandem-edge
EDGE="${TANDEM_EDGE_BIN:-${CARGO_TARGET_DIR:-target}/release/tandem-edge}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
DRAFTS=(${DRAFTS:-none trained layers:12 layers:25 ngram})
python3 - "$WORK" <<'PY'
import json, sys, os, urllib.request
work = sys.argv[1]
# The bench's chat prompts (bench/src/prompts.rs) and HumanEval's first six.
src = open("bench/src/prompts.rs").read()
chat = [l.strip().strip('",') for l in src[src.index("CHAT_PROMPTS"):src.index("];")].splitlines()[1:] if l.strip().startswith('"')]
home = os.environ.get("TANDEM_HOME", os.path.expanduser("~/.cache/tandem"))
code = []
for root, _, files in os.walk(home):
    for f in files:
        if f.startswith("HumanEval") and f.endswith(".jsonl"):
            code = [json.loads(l)["prompt"] for l in open(os.path.join(root, f)) if l.strip()][:6]
json.dump({"chat": chat, "code": code}, open(os.path.join(work, "prompts.json"), "w"))
print(f"{len(chat)} chat and {len(code)} code prompts", file=sys.stderr)
PY
for d in "${DRAFTS[@]}"; do
    echo "draft $d ..." >&2
    python3 - "$WORK" "$d" "$EDGE" ${EXTRA_ARGS:-} <<'PY'
import json, subprocess, sys
work, draft, edge = sys.argv[1:4]
extra = sys.argv[4:]
prompts = json.load(open(f"{work}/prompts.json"))
with open(f"{work}/{draft.replace(':', '_')}.jsonl", "w") as out:
    for kind, ps in prompts.items():
        for p in ps:
            args = [edge, "generate", "--local", "--draft", draft, "--draft-len", "5", "--max-new-tokens", "96", "--prompt", p, "--json"] + extra
            if kind == "code":
                args.append("--raw")
            g = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)
            g["kind"] = kind
            out.write(json.dumps(g) + "\n")
PY
done
python3 - "$WORK" "${DRAFTS[@]}" <<'PY'
import json, sys
work, drafts = sys.argv[1], sys.argv[2:]
runs = {d: [json.loads(l) for l in open(f"{work}/{d.replace(':', '_')}.jsonl")] for d in drafts}
plain = runs["none"]
# The target's cost per token: plain decoding after the first token.
target_ms = sum(g["wall_ms"] - g["ttft_ms"] for g in plain) / sum(len(g["tokens"]) - 1 for g in plain)
print(f"target (plain decoding): {target_ms:.1f} ms per token\n")
print("| draft (k = 5) | acceptance chat / code | tokens/round chat / code | draft ms per drafted token | vs target | speed-up | output = plain |")
print("|---|---|---|---|---|---|---|")
for d in drafts:
    if d == "none":
        continue
    gs = runs[d]
    def rate(kind, f):
        sel = [g for g in gs if g["kind"] == kind]
        return f(sel)
    acc = lambda sel: sum(g["accepted"] for g in sel) / max(1, sum(g["drafted"] for g in sel))
    tpr = lambda sel: sum(len(g["tokens"]) - 1 for g in sel) / max(1, sum(g["rounds"] for g in sel))
    drafted = sum(g["drafted"] for g in gs)
    per = sum(g["draft_ms"] for g in gs) / max(1, drafted)
    same = all(g["tokens"] == p["tokens"] for g, p in zip(gs, plain))
    ms = sum(g["wall_ms"] - g["ttft_ms"] for g in gs) / sum(len(g["tokens"]) - 1 for g in gs)
    print(f"| {d} | {100*rate('chat', acc):.1f} % / {100*rate('code', acc):.1f} % | {rate('chat', tpr):.2f} / {rate('code', tpr):.2f} | {per:.2f} | {per/target_ms:.0%} | {target_ms/ms:.2f}× | {'yes' if same else 'NO'} |")
PY
