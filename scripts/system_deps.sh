#!/usr/bin/env bash
# Debian packages the test suite drives for real: PostgreSQL (MLflow team-server backend) and Chromium +
# ChromeDriver (the MLflow compare page checked in a browser). Installed only when missing, so a warm
# machine pays nothing; a machine without apt/root gets one line saying what to install.
set -euo pipefail
need=()
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || need+=(postgresql)
[[ -x /usr/bin/chromium ]] || need+=(chromium)
[[ -x /usr/bin/chromedriver ]] || need+=(chromium-driver)
(( ${#need[@]} == 0 )) && exit 0
if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null; then
    echo "system_deps.sh: missing ${need[*]}; install them (apt-get install -y ${need[*]}) or the tests that need them fail" >&2
    exit 1
fi
echo "system_deps.sh: apt-get install ${need[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Debian's postgresql package would start a system cluster on 5432; tests run their own on loopback.
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
trap 'rm -f /usr/sbin/policy-rc.d' EXIT
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
