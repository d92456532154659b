#!/usr/bin/env bash
# Write the passwords docker-compose.yml requires into .env (beside it, where compose reads
# it), before the first `docker compose up`:
#   deploy/compose-env.sh [FILE]        # FILE: default .env at the repository's root
# RABBITMQ_PASSWORD (RabbitMQ's user brownout, in every process's RABBITMQ_URL), REDIS_PASSWORD
# (Redis's requirepass, in every REDIS_URL) and GRAFANA_ADMIN_PASSWORD (Grafana's admin); and two
# service keys: BROWNOUT_METRICS_KEY (Prometheus's, the metrics scope) and BROWNOUT_LOCAL_KEY (yours,
# every scope: curl -H "Authorization: Bearer $BROWNOUT_LOCAL_KEY" ...), with BROWNOUT_API_KEYS, their
# hashed entries, which the web and worker read.
# A variable already in FILE is kept; one set in the environment is taken as it is (it goes into
# URLs and .env unescaped: letters, digits, - . _ ~ only); the others get 24 random bytes in hex. Never
# prints a password: read them in FILE (mode 600). Idempotent. RabbitMQ and Grafana take their
# password when their data is first created: to change one later, change it in the service too
# (or `docker compose down -v`, which deletes the data).
set -euo pipefail

readonly ROOT="$(cd "$(dirname "$0")/.." && pwd)"
readonly FILE="${1:-$ROOT/.env}"
readonly NAMES=(RABBITMQ_PASSWORD REDIS_PASSWORD GRAFANA_ADMIN_PASSWORD)

umask 077
touch "$FILE"
chmod 600 "$FILE"

random_hex() { od -An -tx1 -N24 /dev/urandom | tr -d ' \n'; }

for name in "${NAMES[@]}"; do
    if grep -q "^$name=." "$FILE"; then
        continue
    fi
    value="${!name:-}"
    if [[ -n $value ]]; then
        if [[ ! $value =~ ^[A-Za-z0-9._~-]+$ ]]; then
            echo "compose-env: $name from the environment may hold only letters, digits and - . _ ~ (it goes unescaped into a URL and into .env)" >&2
            exit 1
        fi
        source="the environment"
    else
        value="$(random_hex)"
        source="generated"
    fi
    [[ -z $(tail -c 1 "$FILE") ]] || echo >>"$FILE"
    printf '%s=%s\n' "$name" "$value" >>"$FILE"
    echo "compose-env: $name written to $FILE ($source)"
done

# The service keys: made once, with their BROWNOUT_API_KEYS entries (the server keeps only hashes).
if ! grep -q "^BROWNOUT_API_KEYS=." "$FILE"; then
    metrics_key="bo_$(random_hex)"
    local_key="bo_$(random_hex)"
    digest() { printf '%s' "$1" | sha256sum | cut -d' ' -f1; }
    entries="prometheus:$(digest "$metrics_key"):metrics,local:$(digest "$local_key"):admin+metrics+read+write"
    [[ -z $(tail -c 1 "$FILE") ]] || echo >>"$FILE"
    printf 'BROWNOUT_METRICS_KEY=%s\nBROWNOUT_LOCAL_KEY=%s\nBROWNOUT_API_KEYS=%s\n' "$metrics_key" "$local_key" "$entries" >>"$FILE"
    echo "compose-env: BROWNOUT_METRICS_KEY, BROWNOUT_LOCAL_KEY and BROWNOUT_API_KEYS written to $FILE (generated)"
fi
