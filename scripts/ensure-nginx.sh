#!/usr/bin/env bash
# The coordinator's public port is an nginx TLS front (server/front.py) and the tests start
# real ones: install nginx from the OS packages where it is missing (as root, with apt-get,
# e.g. CI on Debian). Its service is not started (policy-rc.d): only m2diff-server starts
# nginx. Without root or apt-get it says what to install and fails.
set -euo pipefail
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "[setup] nginx is missing and cannot be installed here (needs root and apt-get):" \
         "install the OS package 'nginx' first (the tests start real nginx TLS fronts)" >&2
    exit 1
  fi
  echo "[setup] installing nginx (OS package)" >&2
  policy=/usr/sbin/policy-rc.d
  made_policy=
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"; made_policy=1; fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq --no-install-recommends nginx >/dev/null
  [ -z "$made_policy" ] || rm -f "$policy"
fi
nginx_bin=$(command -v nginx 2>/dev/null || echo /usr/sbin/nginx)
"$nginx_bin" -v >/dev/null 2>&1 || { echo "[setup] $nginx_bin does not run" >&2; exit 1; }
