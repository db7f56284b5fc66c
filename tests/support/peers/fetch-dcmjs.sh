#!/usr/bin/env bash
# Install the dcmjs-dimse test peer (tests/support/peers/dcmjs/node_modules) with `npm ci`,
# exactly as pinned in package-lock.json. Idempotent: does nothing when node_modules already
# matches the lock file (a stamp holds the lock file's sha256). Without Node.js/npm it only
# warns: the tests that need this peer then skip with a clear reason.
# Called by deploy/bootstrap.sh; safe to run by hand.
set -euo pipefail
cd "$(dirname "$0")/dcmjs"

if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
  echo "fetch-dcmjs: node/npm not found; dcmjs-dimse peer tests will be skipped" >&2
  exit 0
fi

STAMP=node_modules/.ddn-lock-sha256
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -f node_modules/dcmjs-dimse/package.json ]; then
  exit 0
fi

echo "fetch-dcmjs: npm ci in $(pwd)"
# --ignore-scripts: no dependency needs an install script (core-js-pure's only prints a banner).
npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
echo "$want" > "$STAMP"
