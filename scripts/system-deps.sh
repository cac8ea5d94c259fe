#!/usr/bin/env bash
# Debian packages the integration tests drive as real peers: swaks (SMTP client) and openssl.
set -euo pipefail
need=()
command -v swaks >/dev/null || need+=(swaks)
command -v openssl >/dev/null || need+=(openssl)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "system-deps: please install: ${need[*]} (apt-get install -y ${need[*]})" >&2
    exit 1
fi
echo "system-deps: installing ${need[*]}" >&2
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
