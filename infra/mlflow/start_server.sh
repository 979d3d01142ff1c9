#!/usr/bin/env bash
# Start the team MLflow tracking server: PostgreSQL metadata store, proxied artifact store, basic auth.
# Runs in the foreground (exec); put it under systemd/tmux/nohup as you like.
#
# Required environment:
#   PEFTSWEEP_PG_URI                postgresql://USER:PASS@HOST:PORT/DB   runs, params, metrics, registry
#   PEFTSWEEP_AUTH_DB_URI           postgresql://USER:PASS@HOST:PORT/DB_auth   users and permissions
#                                   (a separate database; local_postgres.sh creates one)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  static random string (CSRF key of the auth UI), e.g.
#                                   python3 -c 'import secrets; print(secrets.token_hex(32))'
#   MLFLOW_AUTH_ADMIN_PASSWORD      admin password (>= 12 chars); required on the first start against an
#                                   empty auth database, ignored once the admin user exists
# Optional environment:
#   MLFLOW_AUTH_ADMIN_USERNAME      admin user name                      (default: admin, from basic_auth.ini)
#   PEFTSWEEP_MLFLOW_HOST           interface to bind                    (default: 127.0.0.1)
#                                   anything else (0.0.0.0, a LAN address) must be set here explicitly;
#                                   basic auth over plain HTTP sends passwords in clear text, so put a
#                                   TLS reverse proxy in front when leaving localhost
#   PEFTSWEEP_MLFLOW_PORT           port                                 (default: 5000)
#   PEFTSWEEP_MLFLOW_WORKERS        uvicorn workers; each is a full MLflow process of roughly 250-300 MB,
#                                   MLflow's default of 4 costs ~1 GB more than 1  (default: 1)
#   PEFTSWEEP_ARTIFACTS_DESTINATION where the server stores artifacts (adapters, models): a local
#                                   directory or s3://bucket/prefix (needs boto3 and AWS credentials
#                                   on the server only; clients upload through the server)
#                                   (default: $PEFTSWEEP_MLFLOW_STATE_DIR/artifacts)
#   PEFTSWEEP_MLFLOW_STATE_DIR      private dir for the runtime auth config and local artifacts
#                                   (default: ${XDG_STATE_HOME:-$HOME/.local/state}/peftsweep/mlflow-server)
#   PEFTSWEEP_MLFLOW_ALLOWED_HOSTS  passed to --allowed-hosts (Host header allow-list; MLflow's default
#                                   is localhost + private IP ranges); set it when serving a DNS name
#   PEFTSWEEP_MLFLOW_BIN            mlflow executable                    (default: mlflow on PATH)
# Extra arguments are passed to `mlflow server` unchanged.
#
# Secrets are only read from the environment and never printed: the backend URI reaches MLflow through
# MLFLOW_BACKEND_STORE_URI (the env form of --backend-store-uri) so it does not show up in `ps`, and the
# auth DB URI through a 0600 runtime copy of basic_auth.ini (MLflow reads that URI only from the file).
set -euo pipefail

die() { printf 'start_server.sh: error: %s\n' "$*" >&2; exit 1; }
log() { printf 'start_server.sh: %s\n' "$*" >&2; }
redact() { sed -E 's#(://[^:/@]*):[^@]*@#\1:***@#' <<<"$1"; }

SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd -P)"
AUTH_TEMPLATE="$SCRIPT_DIR/basic_auth.ini"
[[ -f "$AUTH_TEMPLATE" ]] || die "missing $AUTH_TEMPLATE"

# ---- required environment -------------------------------------------------------------------
missing=()
for v in PEFTSWEEP_PG_URI PEFTSWEEP_AUTH_DB_URI MLFLOW_FLASK_SERVER_SECRET_KEY; do
    [[ -n "${!v:-}" ]] || missing+=("$v")
done
if (( ${#missing[@]} )); then
    die "set these environment variables first: ${missing[*]} (see the header of $0)"
fi
for v in PEFTSWEEP_PG_URI PEFTSWEEP_AUTH_DB_URI; do
    [[ "${!v}" != *$'\n'* && "${!v}" != *$'\r'* ]] || die "$v contains a line break"
done
case "$PEFTSWEEP_PG_URI" in
    postgresql://* | postgresql+psycopg2://* | postgresql+psycopg://* | postgresql+pg8000://*) ;;
    *) die "PEFTSWEEP_PG_URI must be a postgresql:// URI, got '$(redact "$PEFTSWEEP_PG_URI")'" ;;
esac
case "$PEFTSWEEP_AUTH_DB_URI" in
    postgresql://* | postgresql+*://* | sqlite:///*) ;;
    *) die "PEFTSWEEP_AUTH_DB_URI must be a postgresql:// (or sqlite:///) URI, got '$(redact "$PEFTSWEEP_AUTH_DB_URI")'" ;;
esac
[[ "$PEFTSWEEP_AUTH_DB_URI" != "$PEFTSWEEP_PG_URI" ]] \
    || die "PEFTSWEEP_AUTH_DB_URI must name a different database than PEFTSWEEP_PG_URI"
if [[ -z "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ]]; then
    log "note: MLFLOW_AUTH_ADMIN_PASSWORD is unset; fine only if the admin user already exists"
fi

# ---- optional settings ----------------------------------------------------------------------
HOST="${PEFTSWEEP_MLFLOW_HOST:-127.0.0.1}"
PORT="${PEFTSWEEP_MLFLOW_PORT:-5000}"
WORKERS="${PEFTSWEEP_MLFLOW_WORKERS:-1}"
STATE_DIR="${PEFTSWEEP_MLFLOW_STATE_DIR:-${XDG_STATE_HOME:-${HOME:?HOME is unset}/.local/state}/peftsweep/mlflow-server}"
ARTIFACTS="${PEFTSWEEP_ARTIFACTS_DESTINATION:-$STATE_DIR/artifacts}"
MLFLOW_BIN="${PEFTSWEEP_MLFLOW_BIN:-mlflow}"

if ! [[ "$PORT" =~ ^[0-9]+$ ]] || (( PORT < 1 || PORT > 65535 )); then
    die "PEFTSWEEP_MLFLOW_PORT must be a port number, got '$PORT'"
fi
[[ "$WORKERS" =~ ^[1-9][0-9]*$ ]] || die "PEFTSWEEP_MLFLOW_WORKERS must be a positive integer, got '$WORKERS'"
case "$HOST" in
    127.* | localhost | ::1) ;;
    *) log "warning: binding to $HOST (not loopback). Basic auth sends passwords in clear text over HTTP;" \
           "expose this port only behind a TLS reverse proxy or on a trusted network." ;;
esac

MLFLOW_PATH="$(command -v -- "$MLFLOW_BIN")" || die "'$MLFLOW_BIN' not found; activate the venv with mlflow or set PEFTSWEEP_MLFLOW_BIN"
# Catch a missing database driver or auth dependency here rather than in a worker traceback.
# SQLAlchemy 2.1 maps plain postgresql:// to psycopg (v3); postgresql+psycopg2:// selects psycopg2.
# The URIs reach this check through the environment, not argv.
PY="$(dirname -- "$MLFLOW_PATH")/python"
if [[ -x "$PY" ]]; then
    driver_err="$("$PY" - 2>&1 <<'EOF'
import os, sys
try:
    import flask_wtf  # noqa: F401  (--app-name basic-auth needs it)
except ImportError:
    sys.exit(f"the basic-auth app needs Flask-WTF; install it: {sys.executable} -m pip install 'mlflow[auth]'")
from sqlalchemy.engine import make_url
for var in ("PEFTSWEEP_PG_URI", "PEFTSWEEP_AUTH_DB_URI"):
    try:
        dialect = make_url(os.environ[var]).get_dialect()
    except Exception as e:
        sys.exit(f"{var} is not a valid SQLAlchemy URI ({type(e).__name__})")
    try:
        dialect.import_dbapi()
    except ImportError:
        pkg = {"psycopg2": "psycopg2-binary", "psycopg": "'psycopg[binary]'"}.get(dialect.driver, dialect.driver)
        sys.exit(f"{var} needs the Python driver '{dialect.driver}', which is not installed "
                 f"next to mlflow; install it ({sys.executable} -m pip install {pkg}) "
                 f"or pick another driver in the URI scheme, e.g. postgresql+psycopg2://")
EOF
)" || die "$driver_err"
fi

# ---- state dir, artifact store, runtime auth config ----------------------------------------
umask 077
mkdir -p -- "$STATE_DIR"
chmod 0700 -- "$STATE_DIR"
case "$ARTIFACTS" in
    *://*) ;;                                   # s3://, gs://, ... used as is
    /*) mkdir -p -- "$ARTIFACTS" ;;
    *) mkdir -p -- "$ARTIFACTS"; ARTIFACTS="$(cd -- "$ARTIFACTS" && pwd -P)" ;;
esac

AUTH_INI="$STATE_DIR/basic_auth.runtime.ini"
grep -q '^database_uri = @PEFTSWEEP_AUTH_DB_URI@$' "$AUTH_TEMPLATE" \
    || die "$AUTH_TEMPLATE lacks the line 'database_uri = @PEFTSWEEP_AUTH_DB_URI@'"
# configparser treats '%' as interpolation syntax: a URL-encoded password needs '%%'.
auth_uri_ini="${PEFTSWEEP_AUTH_DB_URI//\%/%%}"
tmp_ini="$(mktemp "$STATE_DIR/.basic_auth.XXXXXX")"
while IFS= read -r line || [[ -n "$line" ]]; do
    if [[ "$line" == 'database_uri = @PEFTSWEEP_AUTH_DB_URI@' ]]; then
        printf 'database_uri = %s\n' "$auth_uri_ini"
    else
        printf '%s\n' "$line"
    fi
done <"$AUTH_TEMPLATE" >"$tmp_ini"
mv -f -- "$tmp_ini" "$AUTH_INI"
unset auth_uri_ini

export MLFLOW_AUTH_CONFIG_PATH="$AUTH_INI"
export MLFLOW_BACKEND_STORE_URI="$PEFTSWEEP_PG_URI"

args=(server
    --host "$HOST" --port "$PORT" --workers "$WORKERS"
    --serve-artifacts --artifacts-destination "$ARTIFACTS"
    --app-name basic-auth)
if [[ -n "${PEFTSWEEP_MLFLOW_ALLOWED_HOSTS:-}" ]]; then
    args+=(--allowed-hosts "$PEFTSWEEP_MLFLOW_ALLOWED_HOSTS")
fi

log "backend store:   $(redact "$PEFTSWEEP_PG_URI")"
log "auth store:      $(redact "$PEFTSWEEP_AUTH_DB_URI") (config $AUTH_INI)"
log "artifacts:       $ARTIFACTS"
log "listening on:    http://$HOST:$PORT  (workers=$WORKERS, basic auth on)"
exec "$MLFLOW_PATH" "${args[@]}" "$@"
