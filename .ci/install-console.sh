#!/bin/sh
# install-console.sh installs what the console tests need from Debian
# packages: Chromium, which cmd/sandboxer's TestConsole drives headless
# (through the DevTools protocol, with chromedp) to use the web console as a
# person would.
#
# Idempotent and non-interactive: nothing runs when chromium is already on
# the PATH, and apt-get runs only when it is missing.
set -eu

if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then
	echo "install-console: nothing to install"
	exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "install-console: installing chromium"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium
