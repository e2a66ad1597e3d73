#!/usr/bin/env bash
# The system programs the tests drive for real: redis-server (queue tests), promtool + prometheus (deploy checks and
# a real scrape), chromium (the playground in a headless browser), docker-compose (validates the compose file; no
# engine needed). `make test` runs this first: as root with apt-get it installs what is missing; otherwise it says
# exactly what to install and stops, so that a run never passes by skipping the tests that need them.
set -euo pipefail

# command on PATH -> Debian package that provides it
declare -A packages=([redis-server]=redis-server [promtool]=prometheus [chromium]=chromium [docker-compose]=docker-compose)
missing=()
for command in redis-server promtool chromium docker-compose; do
    command -v "$command" >/dev/null 2>&1 || missing+=("${packages[$command]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing the programs the tests drive: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    exit 0
fi
echo "make test needs these programs, which the tests drive for real: ${missing[*]}" >&2
echo "install them first, e.g.: sudo apt-get install --no-install-recommends ${missing[*]}" >&2
exit 1
