#!/usr/bin/env bash
# Make the backing services Brownout needs answer on this Debian machine:
# PostgreSQL (127.0.0.1:5432, SSL on, role and database "brownout"),
# RabbitMQ (127.0.0.1:5672) and Redis (127.0.0.1:6379); also installs pgbouncer
# (not started: the tests run their own) and ssl-cert.
# Installs what is missing and starts what is down. It never stops or restarts a
# running service: PostgreSQL settings are applied with a reload. Idempotent.
# Used by the README set-up and by CI (.ci/run, as root, no stdin).
set -euo pipefail

export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
export DEBIAN_FRONTEND=noninteractive

if [[ $EUID -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "local-services: run as root (sudo not found)" >&2; exit 1; }
    exec sudo -- "$BASH" "$0" "$@"
fi

readonly HOST=127.0.0.1
readonly APT_LOG=/tmp/brownout-local-services-apt.log
readonly START_LOG=/tmp/brownout-local-services-start.log
readonly SNAKEOIL_CERT=/etc/ssl/certs/ssl-cert-snakeoil.pem
readonly SNAKEOIL_KEY=/etc/ssl/private/ssl-cert-snakeoil.key
apt_updated=false

die() { echo "local-services: $*" >&2; exit 1; }

port_open() { timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$1" 2>/dev/null; }

have_systemd() { [[ -d /run/systemd/system ]]; }

apt_install() {  # apt_install PACKAGE...: one apt-get update per run, output to $APT_LOG
    if ! $apt_updated; then
        apt-get update >>"$APT_LOG" 2>&1 || die "apt-get update failed (see $APT_LOG)"
        apt_updated=true
    fi
    apt-get install -y "$@" >>"$APT_LOG" 2>&1 || die "apt-get install $* failed (see $APT_LOG)"
}

pkg_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

server_installed() {  # server_installed NAME
    case $1 in
        postgresql) command -v pg_ctlcluster >/dev/null && compgen -G '/etc/postgresql/*/main/postgresql.conf' >/dev/null ;;
        rabbitmq) command -v rabbitmq-server >/dev/null ;;
        redis) command -v redis-server >/dev/null && command -v redis-cli >/dev/null ;;
    esac
}

wait_for() {  # wait_for NAME PORT SECONDS LOG [extra readiness command...]
    local name=$1 port=$2 seconds=$3 log=$4 i
    shift 4
    for ((i = 0; i < seconds; i++)); do
        if port_open "$port" && { [[ $# -eq 0 ]] || "$@" >/dev/null 2>&1; }; then
            return 0
        fi
        sleep 1
    done
    die "$name did not answer on $HOST:$port within ${seconds}s (see $log)"
}

pg_version() {  # major version of the cluster "main" on port 5432, else the newest installed
    local v
    v=$(pg_lsclusters -h 2>/dev/null | awk '$2 == "main" && $3 == 5432 { print $1; exit }')
    [[ -n $v ]] || v=$(find /etc/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' 2>/dev/null | sort -V | tail -n 1)
    [[ -n $v ]] || die "postgresql: no cluster found under /etc/postgresql"
    echo "$v"
}

start_server() {  # start_server NAME PORT: start it (it is installed and down), then wait until it answers
    local name=$1 port=$2 log ver
    case $name in
        postgresql)
            ver=$(pg_version)
            log=/var/log/postgresql/postgresql-$ver-main.log
            if have_systemd; then systemctl start "postgresql@$ver-main"
            else pg_ctlcluster --skip-systemctl-redirect "$ver" main start; fi >>"$START_LOG" 2>&1 \
                || die "postgresql: could not start cluster $ver/main (see $log and $START_LOG)"
            wait_for "$name" "$port" 60 "$log" pg_isready -h "$HOST" -p "$port" ;;
        redis)
            log=/var/log/redis/ci.log
            mkdir -p /var/lib/redis /var/log/redis
            if have_systemd; then systemctl start redis-server
            else redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
                    --appendonly no --dir /var/lib/redis --logfile "$log"; fi >>"$START_LOG" 2>&1 \
                || die "redis: could not start (see $log and $START_LOG)"
            wait_for "$name" "$port" 60 "$log" ;;
        rabbitmq)
            log=/var/log/rabbitmq/
            if have_systemd; then systemctl start rabbitmq-server
            else rabbitmq-server -detached; fi >>"$START_LOG" 2>&1 \
                || die "rabbitmq: could not start (see $log and $START_LOG)"
            wait_for "$name" "$port" 120 "$log" ;;
    esac
}

psql_admin() {  # psql as the postgres superuser over the Unix socket
    runuser -u postgres -- psql -X -q -At -v ON_ERROR_STOP=1 -p 5432 "$@"
}

pg_ensure_ssl() {  # prints "ssl on" or "ssl turned on"
    local ssl config_file conf_dir i
    ssl=$(psql_admin -c 'SHOW ssl') || die "postgresql: psql as user postgres over the Unix socket failed"
    [[ $ssl == on ]] && { echo "ssl on"; return 0; }
    [[ -f $SNAKEOIL_CERT ]] || make-ssl-cert generate-default-snakeoil >>"$START_LOG" 2>&1 \
        || die "postgresql: make-ssl-cert generate-default-snakeoil failed (see $START_LOG)"
    [[ " $(id -nG postgres) " == *" ssl-cert "* ]] || usermod -a -G ssl-cert postgres
    config_file=$(psql_admin -c 'SHOW config_file') || die "postgresql: could not read config_file"
    conf_dir=$(dirname "$config_file")/conf.d
    mkdir -p "$conf_dir"
    cat >"$conf_dir/60-brownout-ssl.conf" <<EOF
# Written by deploy/local-services.sh: Brownout's tests and services need SSL.
ssl = on
ssl_cert_file = '$SNAKEOIL_CERT'
ssl_key_file = '$SNAKEOIL_KEY'
EOF
    chmod 644 "$conf_dir/60-brownout-ssl.conf"
    psql_admin -c 'SELECT pg_reload_conf()' >/dev/null
    for ((i = 0; i < 10; i++)); do
        [[ $(psql_admin -c 'SHOW ssl') == on ]] && { echo "ssl turned on"; return 0; }
        sleep 1
    done
    die "postgresql: ssl still off after reload with $conf_dir/60-brownout-ssl.conf (see /var/log/postgresql/;" \
        "if postgres was just added to group ssl-cert, the running server only sees that after a restart)"
}

pg_ensure_role_and_db() {
    psql_admin <<'SQL' >/dev/null
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'brownout') THEN
        CREATE ROLE brownout LOGIN CREATEDB PASSWORD 'brownout';
    ELSE
        ALTER ROLE brownout LOGIN CREATEDB PASSWORD 'brownout';
    END IF;
END
$$;
SELECT 'CREATE DATABASE brownout OWNER brownout'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = 'brownout')
\gexec
SELECT 'ALTER DATABASE brownout OWNER TO brownout'
WHERE (SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = 'brownout') <> 'brownout'
\gexec
SQL
}

main() {
    cd /   # psql run as postgres complains about a cwd it cannot enter (e.g. /root)
    : >"$START_LOG"
    local -A port=([postgresql]=5432 [rabbitmq]=5672 [redis]=6379)
    local -A package=([postgresql]=postgresql [rabbitmq]=rabbitmq-server [redis]=redis-server)
    local -A how=()
    local name missing=() ssl
    for name in postgresql rabbitmq redis; do
        if port_open "${port[$name]}"; then
            how[$name]=running
        elif server_installed "$name"; then
            how[$name]=started
        else
            how[$name]="installed, started"
            missing+=("${package[$name]}")
        fi
    done
    pkg_installed pgbouncer || missing+=(pgbouncer)
    pkg_installed ssl-cert || missing+=(ssl-cert)
    # promtool and amtool: the test suite checks and unit-tests the alert rules and Alertmanager config.
    local tools=()
    command -v promtool >/dev/null || tools+=(prometheus)
    command -v amtool >/dev/null || tools+=(prometheus-alertmanager)
    if ((${#missing[@]})); then apt_install "${missing[@]}"; fi
    if ((${#tools[@]})); then apt_install --no-install-recommends "${tools[@]}"; fi
    if [[ " ${missing[*]} " == *" pgbouncer "* ]]; then
        # Without a policy-rc.d the package starts its own PgBouncer on :6432; undo only that.
        if have_systemd; then systemctl disable --now pgbouncer.service
        else /etc/init.d/pgbouncer stop; fi >>"$APT_LOG" 2>&1 || true
    fi
    for tool in prometheus prometheus-alertmanager; do  # only the tools are wanted, not the servers
        if [[ " ${tools[*]} " == *" $tool "* ]]; then
            if have_systemd; then systemctl disable --now "$tool.service"
            else "/etc/init.d/$tool" stop; fi >>"$APT_LOG" 2>&1 || true
        fi
    done

    for name in postgresql rabbitmq redis; do
        # a freshly installed package may have started its server already
        port_open "${port[$name]}" || start_server "$name" "${port[$name]}"
    done

    pg_isready -q -h "$HOST" -p 5432 || die "postgresql: pg_isready fails on $HOST:5432 (see /var/log/postgresql/)"
    ssl=$(pg_ensure_ssl)
    pg_ensure_role_and_db || die "postgresql: could not create role/database brownout"
    PGPASSWORD=brownout psql -X -q -At "host=$HOST port=5432 user=brownout dbname=brownout sslmode=require" \
        -c 'SELECT 1' >/dev/null 2>>"$START_LOG" \
        || die "postgresql: password login as brownout over TCP with sslmode=require failed (see $START_LOG)"
    [[ $(redis-cli -h "$HOST" -p 6379 ping 2>/dev/null) == PONG ]] \
        || die "redis: redis-cli ping did not answer PONG (see /var/log/redis/)"

    echo "postgresql: up on $HOST:5432 (${how[postgresql]}; $ssl; role and db brownout ready)"
    echo "rabbitmq: up on $HOST:5672 (${how[rabbitmq]})"
    echo "redis: up on $HOST:6379 (${how[redis]}; PONG)"
    echo "pgbouncer, ssl-cert, promtool, amtool: installed (pgbouncer, prometheus, alertmanager not started)"
}

main "$@"
