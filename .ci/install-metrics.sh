#!/bin/sh
# install-metrics.sh installs what the metrics tests need from Debian
# packages: promtool, from the prometheus package, which cmd/sandboxer's
# TestMetrics pipes a scrape of /metrics through (`promtool check
# metrics`) and which checks and unit-tests deploy/prometheus/rules.yml
# (`promtool check rules`, `promtool test rules`).
#
# Idempotent and non-interactive: nothing runs when promtool is already on
# the PATH, and apt-get runs only when it is missing. The package's server
# is not started: only its promtool binary is used.
set -eu

if command -v promtool >/dev/null 2>&1; then
	echo "install-metrics: nothing to install"
	exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "install-metrics: installing promtool (Debian package prometheus)"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus
command -v promtool >/dev/null 2>&1 || { echo "install-metrics: promtool still missing after installing prometheus" >&2; exit 1; }
