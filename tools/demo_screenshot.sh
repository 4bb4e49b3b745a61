#!/usr/bin/env bash
# Opens the web demo in headless Chromium, runs one prediction, and saves a screenshot.
#
#   tools/demo_screenshot.sh [CHECKPOINT] [OUT.png] [EXAMPLE_NUMBER]
#   defaults: workdir/synthetic/checkpoints (what `python train.py` writes), docs/demo.png, 2
#
# Needs Debian's Chromium (`apt-get update && apt-get install -y chromium`) and Playwright's
# Python package (`pip install playwright`; no browser download: it drives /usr/bin/chromium).
# Neither is in requirements.txt: CI does not run a browser.
#
# Steps: start `python demo.py --checkpoint CHECKPOINT` on a free localhost port, wait until it
# answers, open the page, click example EXAMPLE_NUMBER (1-based, examples/synthetic), press
# "Segment", wait for the verdict, and save a full-page screenshot.
set -euo pipefail
cd "$(dirname "$0")/.."
CHECKPOINT=${1:-workdir/synthetic/checkpoints}
OUT=${2:-docs/demo.png}
EXAMPLE=${3:-2}
CHROMIUM=${CHROMIUM:-/usr/bin/chromium}
[ -x "$CHROMIUM" ] || { echo "error: $CHROMIUM not found (apt-get install -y chromium)" >&2; exit 1; }
python -c "import playwright" 2>/dev/null || { echo "error: pip install playwright" >&2; exit 1; }

PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
LOG=$(mktemp)
python demo.py --checkpoint "$CHECKPOINT" --port "$PORT" > "$LOG" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; rm -f "$LOG"' EXIT
for _ in $(seq 240); do
  if python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$PORT/')" 2>/dev/null; then
    break
  fi
  kill -0 $SERVER 2>/dev/null || { echo "error: demo.py stopped:" >&2; cat "$LOG" >&2; exit 1; }
  sleep 1
done

python - "$PORT" "$OUT" "$EXAMPLE" "$CHROMIUM" <<'PY'
import sys
from playwright.sync_api import sync_playwright

port, out, example, chromium = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
flags = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
with sync_playwright() as p:
  browser = p.chromium.launch(executable_path=chromium, args=flags)
  page = browser.new_page(viewport={"width": 1280, "height": 900})
  page.goto(f"http://127.0.0.1:{port}/", wait_until="networkidle")
  page.locator("td.textbox").nth(example - 1).click()  # the example's expression cell
  page.wait_for_timeout(1000)  # the example fills the inputs
  page.get_by_role("button", name="Segment").click()
  page.wait_for_function(
      "() => [...document.querySelectorAll('.prose')].some(e => /tau|no target/.test(e.innerText))",
      timeout=120_000)
  page.wait_for_timeout(1000)  # images finish loading
  page.screenshot(path=out, full_page=True)
  browser.close()
print(f"wrote {out}")
PY
