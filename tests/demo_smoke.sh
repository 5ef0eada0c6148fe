#!/usr/bin/env bash
# `make demo` end to end, as a newcomer runs it (called by .ci/run): train, index, eval, BM25, then
# serve; wait until /readyz answers, run the exact curl commands `make demo` printed and check
# their answers, load the web page, then stop the server. Usage: tests/demo_smoke.sh [port]
set -euo pipefail
cd "$(dirname "$0")/.."
PORT=${1:-8765}
DEMO=runs/ci-demo
LOG=$(mktemp)
setsid make demo DEMO=$DEMO PORT="$PORT" >"$LOG" 2>&1 &
MAKE_PID=$!
stop() { kill -TERM -- "-$MAKE_PID" 2>/dev/null || true; wait "$MAKE_PID" 2>/dev/null || true; }
trap stop EXIT
for _ in $(seq 1 900); do
  if curl -sf "localhost:$PORT/readyz" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$MAKE_PID" 2>/dev/null; then echo "make demo exited early:"; tail -40 "$LOG"; exit 1; fi
  sleep 1
done
curl -sf "localhost:$PORT/readyz" >/dev/null || { echo "demo server not ready after 15 min"; tail -40 "$LOG"; exit 1; }
grep -q "ndcg@10" "$LOG" || { echo "make demo printed no evaluation"; exit 1; }
mapfile -t CALLS < <(grep '^curl ' "$LOG")
[ "${#CALLS[@]}" -eq 2 ] || { echo "expected 2 printed curl calls, got ${#CALLS[@]}"; exit 1; }
search=$(eval "${CALLS[0]}")
score=$(eval "${CALLS[1]}")
python3 - "$search" "$score" <<'PY'
import json, sys
search, score = json.loads(sys.argv[1]), json.loads(sys.argv[2])
top = search["results"][0]
assert len(top) == 3 and top[0]["title"] == "The Ember Light", top  # the demo's answer to its own question
item = score["results"][0]
assert item["rank"] == 1 and item["probabilities"][0] > 0.5 and item["loss"] > 0, item
print(f"demo ok: top hit {top[0]['title']!r} ({top[0]['score']:.3f}); /score loss {item['loss']:.3f}, P(positive) {item['probabilities'][0]:.3f}")
PY
# read the page whole, then look (grep -q in a pipe exits at its first match, and curl, still
# writing, then fails with a broken pipe: under pipefail a flaky "no page")
page=$(curl -sf "localhost:$PORT/") && grep -q "<title>" <<<"$page" || { echo "no web page at /"; exit 1; }
