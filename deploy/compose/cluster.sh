#!/bin/sh
# cluster.sh up|down|clean|logs|ps|dump FILE: the Docker half of `make cluster-up`
# and friends (cluster.mk builds the binaries first). Run from anywhere;
# it works in deploy/compose. Environment:
#   CLI      the host's sandboxer binary (cluster.mk passes bin/sandboxer)
#   COMPOSE  the compose command (default: `docker compose` when the plugin
#            answers, else docker-compose)
set -eu

here=$(cd "$(dirname "$0")" && pwd)
cd "$here"
CLI=${CLI:-$here/../../bin/sandboxer}
if [ -z "${COMPOSE:-}" ]; then
	if docker compose version >/dev/null 2>&1; then COMPOSE="docker compose"; else COMPOSE=docker-compose; fi
fi

# The host's views of the cluster.
HOST_NATS=nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224
GATEWAY=http://127.0.0.1:8080
MONITORS="8222 8223 8224"
GATEWAYS="8080 8081"

say() { printf '== %s\n' "$*"; }
die() { printf 'cluster: %s\n' "$*" >&2; exit 1; }
compose() { $COMPOSE "$@"; }

# wait_for SECONDS WHAT COMMAND...: runs COMMAND every half second until it
# succeeds, or fails after SECONDS.
wait_for() {
	secs=$1 what=$2
	shift 2
	n=$((secs * 2))
	until "$@" >/dev/null 2>&1; do
		n=$((n - 1))
		[ "$n" -gt 0 ] || die "$what: not after ${secs}s"
		sleep 0.5
	done
}

# .env: the project name, and the user every container runs as (the owner
# of state/, so that each process reads its 0600 .creds file and nothing
# else needs to be readable by anyone).
write_env() {
	cat >.env <<-EOF
		# Written by cluster.sh: the compose project and the user its containers run as.
		COMPOSE_PROJECT_NAME=sandboxer
		SANDBOXER_UID=$(id -u)
		SANDBOXER_GID=$(id -g)
	EOF
}

build_images() {
	for img in sandboxer nats prometheus; do
		tag=sandboxer:dev
		[ "$img" != sandboxer ] && tag=sandboxer-$img:dev
		out=$(docker build -q -t "$tag" --build-arg UID="$(id -u)" --build-arg GID="$(id -g)" \
			-f "$img.Dockerfile" "build/$img" 2>&1) || { printf '%s\n' "$out" >&2; die "building $tag"; }
		say "image $tag $(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.1f MB", $1/1e6}')"
	done
}

# state/ is a data directory of the CLI: auth/ (the authority), creds/ (one
# .creds per identity), keys/ (API keys), and nats/ (the nodes' generated
# configuration). Mode 0700, files 0600.
write_state() {
	umask 077
	mkdir -p state/auth state/creds state/keys state/nats
	chmod 700 state state/auth state/creds state/keys state/nats
	"$CLI" creds init --auth-dir state/auth | sed -n 's/^account *//p' | sed 's/^/== account /'
	issue admin --role admin
	issue gateway --role gateway
	issue registry --role registry
	issue metering --role metering
	issue provisioner-local --role provisioner --extension local
	issue provisioner-saas-stub --role provisioner --extension saas-stub
	issue dev --role tenant --consumer dev
	issue billing --role billing
	# Again at every start: a revocation since is in the account JWT it preloads.
	"$CLI" creds server-config --auth-dir state/auth --resolver-dir /data/jwt >state/nats/auth.conf
	if [ ! -s state/nats/routes.conf ]; then
		pw=$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')
		cat >state/nats/routes.conf <<-EOF
			# The routes between n1, n2 and n3 are a user of their own (written once by cluster.sh).
			authorization { user: route, password: "$pw" }
			routes: [
			  "nats-route://route:$pw@n1:6222"
			  "nats-route://route:$pw@n2:6222"
			  "nats-route://route:$pw@n3:6222"
			]
		EOF
	fi
}

# issue NAME ARGS...: state/creds/NAME.creds, issued again at every start:
# a user's permissions are in its JWT as the CLI of the day derives them
# from its role, so a kept file would keep yesterday's (a pool's new
# durable refused). Written over in place: a running container's bind
# mount of the file sees the new one.
issue() {
	name=$1
	shift
	"$CLI" creds issue --auth-dir state/auth --out "state/creds/$name.creds.new" --note "make cluster-up" "$@" >/dev/null
	cat "state/creds/$name.creds.new" >"state/creds/$name.creds"
	rm -f "state/creds/$name.creds.new"
}

setup_log() { compose logs --no-color setup | sed -n 's/^setup[^|]*| //p'; }
healthy() { curl -fsS -o /dev/null "http://127.0.0.1:$1/healthz?js-meta-only=true"; }
ready() { curl -fsS -o /dev/null "http://127.0.0.1:$1/readyz"; }
# key_works WHO PATH: the key in state/keys/WHO.token is known to the gateway.
key_works() {
	[ -s "state/keys/$1.token" ] &&
		curl -fsS -o /dev/null -H "Authorization: Bearer $(cat "state/keys/$1.token")" "$GATEWAY$2"
}
# pools_live: the local and saas-stub pools have two live workers each
# (their heartbeats, as the gateway sees them).
pools_live() {
	curl -fsS -H "Authorization: Bearer $(cat state/keys/dev.token)" "$GATEWAY/v1/workers" |
		jq -e '[.pools[] | select(.extension | test("(^|[.])(local|saas-stub)$")) | .live_workers // [] | length]
			| length == 2 and all(. >= 2)'
}

write_keys() {
	umask 077
	if key_works admin /v1/keys; then
		say "admin key: kept state/keys/admin.token"
	else
		"$CLI" keys bootstrap --nats "$HOST_NATS" --creds state/creds/admin.creds --out state/keys/admin.token
	fi
	if key_works dev /v1/credits/balance; then
		say "dev key: kept state/keys/dev.token"
	else
		"$CLI" keys issue --url "$GATEWAY" --data-dir state --consumer dev --name "dev key of make cluster-up" >state/keys/dev.token.new
		mv state/keys/dev.token.new state/keys/dev.token
	fi
}

# scraped: Prometheus has found every service and scraped each once:
# the gateways, both registries and meterings, and every pool's workers.
scraped() {
	curl -fsS http://127.0.0.1:9090/api/v1/targets 2>/dev/null |
		jq -e '[.data.activeTargets[] | select(.health == "up")] | length >= 10' >/dev/null
}

up() {
	command -v curl >/dev/null || die "needs curl"
	command -v jq >/dev/null || die "needs jq"
	[ -x "$CLI" ] || die "no $CLI: run make cluster-up"
	write_env
	build_images
	write_state
	say "NATS nodes n1 n2 n3"
	compose up -d n1 n2 n3
	for p in $MONITORS; do wait_for 60 "node on :$p has no meta leader" healthy "$p"; done
	say "setup --replicas 3, then the services"
	if ! compose up -d; then
		setup_log
		die "setup or a service did not start: make cluster-logs"
	fi
	setup_log
	for p in $GATEWAYS; do wait_for 60 "gateway on :$p not ready" ready "$p"; done
	write_keys
	wait_for 60 "pools without two live workers each" pools_live
	wait_for 60 "prometheus has not scraped every service" scraped
	compose ps
	cat <<-EOF

		sand-boxer runs as a cluster: gateways on http://127.0.0.1:8080 and :8081, NATS on
		127.0.0.1:4222, 4223, 4224 (monitoring :8222..8224). From the repository's root:

		  export SANDBOXER_URL=http://127.0.0.1:8080 SANDBOXER_DATA_DIR=$here/state
		  bin/sandboxer profiles
		  bin/sandboxer create --profile local --wait -o json

		or with flags: bin/sandboxer --url http://127.0.0.1:8080 --data-dir deploy/compose/state list
		(keys: deploy/compose/state/keys/{dev,admin}.token; bus credentials: deploy/compose/state/creds/)

		  go run ./examples/bus-request --nats nats://127.0.0.1:4222 --creds deploy/compose/state/creds/dev.creds --profile local
		  nats -s nats://127.0.0.1:4222 --creds deploy/compose/state/creds/admin.creds stream ls

		Prometheus scrapes every service, with the alert rules of deploy/prometheus:
		http://127.0.0.1:9090 (targets: /targets, alerts: /alerts).

		make cluster-logs follows the logs; make cluster-down stops it and removes its volumes (state/ stays).
	EOF
}

down() {
	write_env
	compose down --volumes --remove-orphans
}

clean() {
	down
	docker image rm sandboxer:dev sandboxer-nats:dev sandboxer-prometheus:dev >/dev/null 2>&1 || true
	# and the earlier builds that a rebuild left untagged
	docker image prune -f --filter label=org.sand-boxer.image >/dev/null
	rm -rf state build .env
}

case "${1:-}" in
up) up ;;
down) down ;;
clean) clean ;;
logs) shift; write_env; compose logs -f --tail=50 "$@" ;;
dump) write_env; mkdir -p "$(dirname "${2:?usage: cluster.sh dump FILE}")"; compose logs --no-color --timestamps >"$2" 2>&1 ;;
ps) write_env; compose ps ;;
*) die "usage: cluster.sh up|down|clean|logs [SERVICE...]|ps|dump FILE" ;;
esac
