#!/usr/bin/env bash
# Fetch OHIF Viewer (the prebuilt static site of the npm package @ohif/app, pinned in
# deploy/ohif/package.json and package-lock.json) into deploy/ohif/node_modules, which git
# ignores. Idempotent: a stamp holding the lockfile's hash skips the work when the pinned
# version is already there. Called by deploy/bootstrap.sh; safe to run by hand. Without
# npm it only warns: the node runs without OHIF, `ddn-node demo` then shows no viewer link
# and the viewer tests skip with a clear reason.
#
# The lockfile lists @ohif/app alone, on purpose: the node serves only its dist/ folder
# (ddn_node/demo/ohif.py), so none of the packages it was built from are installed, and
# no install script runs (--ignore-scripts).
set -euo pipefail
cd "$(dirname "$0")/ohif"

DIST=node_modules/@ohif/app/dist
STAMP=node_modules/.ddn-ohif-installed
want=$(cat package.json package-lock.json | sha256sum | cut -d' ' -f1)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -f "$DIST/index.html" ]; then
  exit 0
fi
if ! command -v npm >/dev/null 2>&1; then
  echo "fetch-ohif: npm not found; OHIF viewer not installed (the viewer tests will be skipped)" >&2
  exit 0
fi
echo "fetch-ohif: installing @ohif/app $(sed -n 's/.*"@ohif\/app": *"\([^"]*\)".*/\1/p' package.json | head -1) into deploy/ohif/node_modules"
npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null
if [ ! -f "$DIST/index.html" ]; then
  echo "fetch-ohif: npm ci finished but $DIST/index.html is missing" >&2
  exit 1
fi
echo "$want" > "$STAMP"
