#!/usr/bin/env bash
# Rebuilds vendor/: installs the pinned charting library from npm and copies its built file.
# vendor/ is committed and embedded in the binary (include_str!), so building Gatehouse and
# serving the dashboard need neither npm nor the network.
set -euo pipefail
cd "$(dirname "$0")"
npm ci --no-audit --no-fund --loglevel=error
mkdir -p vendor
cp node_modules/chart.js/dist/chart.umd.min.js vendor/chart.umd.min.js
cp node_modules/chart.js/LICENSE.md vendor/chart.js.LICENSE.md
echo "vendor/chart.umd.min.js from chart.js $(node -p 'require("./node_modules/chart.js/package.json").version')"
