# Settings for a local run against deploy/local-services.sh, sourced by deploy/run.sh
# and deploy/test.sh. A variable already set in the environment wins.
export DATABASE_URL="${DATABASE_URL:-postgresql://brownout:brownout@127.0.0.1:5432/brownout?sslmode=require}"
export RABBITMQ_URL="${RABBITMQ_URL:-amqp://guest:guest@127.0.0.1:5672/%2F}"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379/0}"
