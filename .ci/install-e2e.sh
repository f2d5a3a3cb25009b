#!/bin/sh
# install-e2e.sh installs what the e2e tests need from Debian packages:
# an OpenSSH server (the tests run their own sshd on a loopback port; the
# system's sshd is never started or configured), busybox-static (the static
# binary the test images are built FROM scratch with) and docker-compose when
# neither `docker compose` nor `docker-compose` is present.
#
# Idempotent and non-interactive: packages already installed are left alone,
# and apt-get runs only when something is missing.
set -eu

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

need=""
[ -x /usr/sbin/sshd ] || need="$need openssh-server"
installed busybox-static || need="$need busybox-static"
if ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null 2>&1; then
	need="$need docker-compose"
fi

if [ -z "$need" ]; then
	echo "install-e2e: nothing to install"
	exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "install-e2e: installing$need"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# A policy-rc.d keeps the package's own sshd service from being started;
# one already present is left as it is.
if [ ! -e /usr/sbin/policy-rc.d ]; then
	$SUDO sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d'
	trap '$SUDO rm -f /usr/sbin/policy-rc.d' EXIT
fi
# shellcheck disable=SC2086
$SUDO apt-get install -y -qq --no-install-recommends $need
