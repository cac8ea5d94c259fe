#!/usr/bin/env bash
# Debian packages the integration tests drive as real peers: swaks (SMTP client), openssl,
# and for DANE a DNSSEC lab: knot (authoritative), unbound (validating resolver) and
# ldnsutils (zone signing); testssl.sh scans our listener; postfix is the benchmark's
# baseline; prometheus scrapes our metrics and chromium renders the transparency report;
# redis-server holds the state several relays share.
# Installed when missing; the tests fail, not skip, without them.
set -euo pipefail
need=()
have() { command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]; }
have swaks || need+=(swaks)
have openssl || need+=(openssl)
have testssl || need+=(testssl.sh)
have postfix || need+=(postfix)  # benchmarks/ compare against it
have knotd || need+=(knot)
have unbound || need+=(unbound)
have ldns-signzone || need+=(ldnsutils)
have prometheus || need+=(prometheus)
have chromium || need+=(chromium)
have redis-server || need+=(redis-server)  # [shared] state of several relays
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "system-deps: please install: ${need[*]} (apt-get install -y ${need[*]})" >&2
    exit 1
fi
echo "system-deps: installing ${need[*]}" >&2
apt-get update -qq
# Postfix's own instance is not used (the benchmark runs a private one): no configuration.
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
# The Debian packages start system-wide daemons we do not use (the tests run their own).
for unit in knot unbound postfix prometheus prometheus-node-exporter redis-server; do
    systemctl disable --now "$unit" >/dev/null 2>&1 || service "$unit" stop >/dev/null 2>&1 || true
done
