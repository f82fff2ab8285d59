#!/usr/bin/env bash
# The real viewer for tests/integration/test_viewer.py, into tests/viewer/node_modules (ignored):
#   playwright-core by `npm ci` (package.json + package-lock.json), and OHIF (@ohif/app, the
#   version and integrity in package.json's "ohifApp") unpacked from its npm tarball.
# Why not `npm ci` for OHIF too: the published @ohif/app 3.13.2 depends on @ohif/i18n and
# @ohif/ui 3.13.2, which were never published, so npm cannot resolve it; and only its prebuilt
# dist/ is needed. Needs node and npm (docker/install.sh --test installs them with Chromium).
# Idempotent: does nothing when the pinned versions are there.
set -euo pipefail
cd "$(dirname "$0")"

version_of() {  # the installed version of a package under node_modules, or nothing
  node -p "try { require('./node_modules/$1/package.json').version } catch (e) { '' }"
}

want_playwright=$(node -p "require('./package.json').dependencies['playwright-core']")
if [ "$(version_of playwright-core)" != "$want_playwright" ]; then
  echo "== viewer tests: playwright-core $want_playwright (npm ci)"
  npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >/dev/null
fi

read -r ohif_name ohif_version ohif_integrity < <(
  node -p "const o = require('./package.json').ohifApp; [o.name, o.version, o.integrity].join(' ')")
if [ "$(version_of "$ohif_name")" != "$ohif_version" ] || [ ! -f "node_modules/$ohif_name/dist/index.html" ]; then
  echo "== viewer tests: $ohif_name $ohif_version (its dist/ only)"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  tarball=$(cd "$tmp" && npm pack "$ohif_name@$ohif_version" --silent)
  node -e "
    const data = require('fs').readFileSync(process.argv[1]);
    const got = 'sha512-' + require('crypto').createHash('sha512').update(data).digest('base64');
    if (got !== process.argv[2]) { console.error('integrity mismatch: ' + got); process.exit(1); }
  " "$tmp/$tarball" "$ohif_integrity"
  rm -rf "node_modules/$ohif_name"
  mkdir -p "node_modules/$ohif_name"
  tar -xzf "$tmp/$tarball" -C "node_modules/$ohif_name" --strip-components=1
fi
