#!/usr/bin/env bash
# Throwaway PostgreSQL cluster for tests and laptops, built from Debian's server binaries
# (apt-get install postgresql). Nothing is registered with the system: the cluster lives in DIR,
# listens on 127.0.0.1 only, and disappears with `stop` + `rm -rf DIR`.
#
#   local_postgres.sh start  DIR [PORT]   init (first time) + start; prints the backend URI on stdout
#   local_postgres.sh stop   DIR          fast shutdown (data kept)
#   local_postgres.sh status DIR          exit 0 when running
#   local_postgres.sh uri    DIR [auth]   print the backend (or basic-auth) database URI
#   local_postgres.sh env    DIR          print `export PEFTSWEEP_PG_URI=... PEFTSWEEP_AUTH_DB_URI=...`
#
# Environment (read by `start` on first init only):
#   PEFTSWEEP_PG_DB        database for MLflow runs/registry   (default: peftsweep)
#                          a second database "<db>_auth" is created for MLflow basic auth
#   PEFTSWEEP_PG_USER      login role owning both databases    (default: peftsweep)
#   PEFTSWEEP_PG_PASSWORD  its password (URL-safe characters)  (default: 32 random hex chars)
#   PEFTSWEEP_PG_DRIVER    SQLAlchemy driver put in the URI scheme (default: psycopg2, giving
#                          postgresql+psycopg2://; SQLAlchemy 2.1 maps bare postgresql:// to psycopg v3).
#                          Set it empty for a bare postgresql:// URI (what psql/libpq accept).
#   PEFTSWEEP_PG_OS_USER   OS account that runs the server when this script runs as root
#                          (PostgreSQL refuses to run as root)  (default: postgres)
#   PEFTSWEEP_PG_BINDIR    directory holding initdb/pg_ctl      (default: newest /usr/lib/postgresql/*/bin)
#
# Layout of DIR: data/ (PGDATA), run/ (unix socket), postgres.log, backend.uri + auth.uri (mode 0600,
# owned by the caller; they contain the password, which is why stdout is the only place it goes).
set -euo pipefail

die() { printf 'local_postgres.sh: error: %s\n' "$*" >&2; exit 1; }
log() { printf 'local_postgres.sh: %s\n' "$*" >&2; }
usage() {
    printf 'usage: %s start DIR [PORT] | stop DIR | status DIR | uri DIR [backend|auth] | env DIR\n' "$0" >&2
    exit 2
}

find_bindir() {
    if [[ -n "${PEFTSWEEP_PG_BINDIR:-}" ]]; then
        [[ -x "$PEFTSWEEP_PG_BINDIR/pg_ctl" ]] || die "PEFTSWEEP_PG_BINDIR=$PEFTSWEEP_PG_BINDIR has no pg_ctl"
        printf '%s\n' "$PEFTSWEEP_PG_BINDIR"
        return
    fi
    local d best=""
    # Version-sort so that 16 beats 9.6.
    while IFS= read -r d; do
        [[ -x "$d/initdb" && -x "$d/pg_ctl" ]] && best="$d"
    done < <(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V)
    [[ -n "$best" ]] || die "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin; run: apt-get install -y postgresql (or set PEFTSWEEP_PG_BINDIR)"
    printf '%s\n' "$best"
}

# Run a command as the OS user that owns the cluster.
as_owner() {
    if [[ "$OWNER" == "$(id -un)" ]]; then
        "$@"
    else
        runuser -u "$OWNER" -- "$@"
    fi
}

resolve_dir() {
    [[ -n "${1:-}" ]] || usage
    local parent
    parent="$(dirname -- "$1")"
    [[ -d "$parent" ]] || die "parent directory of $1 does not exist"
    DIR="$(cd -- "$parent" && pwd -P)/$(basename -- "$1")"
    PGDATA_DIR="$DIR/data"
    SOCK_DIR="$DIR/run"
    LOG_FILE="$DIR/postgres.log"
}

owner_of_existing() {
    [[ -f "$PGDATA_DIR/PG_VERSION" ]] || die "$DIR holds no cluster (run: $0 start $DIR)"
    OWNER="$(stat -c %U -- "$PGDATA_DIR")"
}

is_running() { as_owner "$BINDIR/pg_ctl" -D "$PGDATA_DIR" status >/dev/null 2>&1; }

cmd_start() {
    resolve_dir "${1:-}"
    local port="${2:-55432}"
    if ! [[ "$port" =~ ^[0-9]+$ ]] || (( port < 1024 || port > 65535 )); then
        die "PORT must be 1024..65535, got '$port'"
    fi
    local db="${PEFTSWEEP_PG_DB:-peftsweep}" user="${PEFTSWEEP_PG_USER:-peftsweep}"
    [[ "$db" =~ ^[a-z_][a-z0-9_]{0,50}$ ]] || die "PEFTSWEEP_PG_DB must match [a-z_][a-z0-9_]*"
    [[ "$user" =~ ^[a-z_][a-z0-9_]{0,50}$ ]] || die "PEFTSWEEP_PG_USER must match [a-z_][a-z0-9_]*"
    local driver="${PEFTSWEEP_PG_DRIVER-psycopg2}"
    [[ -z "$driver" || "$driver" =~ ^[a-z0-9_]+$ ]] || die "PEFTSWEEP_PG_DRIVER must be a driver name like psycopg2 or psycopg"
    BINDIR="$(find_bindir)"

    if [[ $EUID -eq 0 ]]; then
        OWNER="${PEFTSWEEP_PG_OS_USER:-postgres}"
        id -u "$OWNER" >/dev/null 2>&1 || die "running as root, but OS user '$OWNER' does not exist; create one (useradd --system $OWNER) or set PEFTSWEEP_PG_OS_USER"
        [[ "$(id -u "$OWNER")" -ne 0 ]] || die "PEFTSWEEP_PG_OS_USER must not be root"
        command -v runuser >/dev/null || die "runuser not found (util-linux)"
    else
        OWNER="$(id -un)"
    fi

    if [[ -f "$PGDATA_DIR/PG_VERSION" ]]; then
        OWNER="$(stat -c %U -- "$PGDATA_DIR")"
        if is_running; then
            log "already running in $DIR"
            cat -- "$DIR/backend.uri"
            return
        fi
        port="$(sed -n "s/^port = \([0-9]*\).*/\1/p" "$PGDATA_DIR/postgresql.conf" | tail -n 1)"
        log "restarting existing cluster in $DIR on 127.0.0.1:$port"
    else
        if [[ -e "$DIR" ]] && [[ -n "$(ls -A -- "$DIR")" ]]; then
            die "$DIR exists and is not empty (and holds no cluster); pick a fresh directory"
        fi
        local password="${PEFTSWEEP_PG_PASSWORD:-}"
        if [[ -z "$password" ]]; then
            password="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
        fi
        [[ "$password" =~ ^[A-Za-z0-9._~-]{8,}$ ]] || die "PEFTSWEEP_PG_PASSWORD must be >= 8 URL-safe characters [A-Za-z0-9._~-]"
        # PostgreSQL's socket is $SOCK_DIR/.s.PGSQL.$port and sun_path holds 107 bytes plus NUL; a longer path
        # fails only after initdb, with a bare "could not create any Unix-domain sockets" in the log.
        local sock_path="$SOCK_DIR/.s.PGSQL.$port" sock_bytes
        sock_bytes="$(LC_ALL=C; printf '%s' "${#sock_path}")"
        (( sock_bytes <= 107 )) \
            || die "socket path $sock_path is $sock_bytes bytes, over the 107-byte unix socket limit; use a shorter DIR"

        mkdir -p -- "$DIR"
        chmod 0755 -- "$DIR"   # the OS user must be able to traverse it; secrets are in 0600/0700 children
        install -d -m 0700 -o "$OWNER" -g "$(id -gn "$OWNER")" -- "$PGDATA_DIR" "$SOCK_DIR"
        install -m 0600 -o "$OWNER" -g "$(id -gn "$OWNER")" /dev/null "$LOG_FILE"
        as_owner test -w "$PGDATA_DIR" || die "OS user '$OWNER' cannot reach $PGDATA_DIR (is a parent directory, e.g. /root, mode 0700?); pick a DIR under /tmp or /var/tmp"

        log "initdb ($BINDIR) in $PGDATA_DIR as OS user $OWNER"
        # Local socket: peer auth for the OS user only. TCP: password (SCRAM) only.
        as_owner "$BINDIR/initdb" -D "$PGDATA_DIR" --auth-local=peer --auth-host=scram-sha-256 \
            --encoding=UTF8 --locale=C.UTF-8 --no-instructions >/dev/null 2>"$DIR/initdb.err" \
            || { cat -- "$DIR/initdb.err" >&2; die "initdb failed"; }
        rm -f -- "$DIR/initdb.err"
        as_owner tee -a "$PGDATA_DIR/postgresql.conf" >/dev/null <<EOF

# --- added by peftsweep infra/mlflow/local_postgres.sh ---
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$SOCK_DIR'
unix_socket_permissions = 0700
password_encryption = 'scram-sha-256'
EOF
        STARTED_NEW=1
        NEW_DRIVER="$driver"
        NEW_DB="$db" NEW_USER="$user" NEW_PASSWORD="$password"
    fi

    if ! as_owner "$BINDIR/pg_ctl" -D "$PGDATA_DIR" -l "$LOG_FILE" -w -t 60 start >/dev/null; then
        tail -n 20 -- "$LOG_FILE" >&2 || true
        die "PostgreSQL did not start (port $port busy? see $LOG_FILE)"
    fi

    if [[ "${STARTED_NEW:-0}" == 1 ]]; then
        local psql=(as_owner "$BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -h "$SOCK_DIR" -p "$port" -d postgres)
        # SQL on stdin, not argv, so the password never shows up in `ps`.
        "${psql[@]}" >/dev/null <<SQL
CREATE ROLE "$NEW_USER" LOGIN PASSWORD '$NEW_PASSWORD';
CREATE DATABASE "$NEW_DB" OWNER "$NEW_USER";
CREATE DATABASE "${NEW_DB}_auth" OWNER "$NEW_USER";
SQL
        local scheme=postgresql
        [[ -n "$NEW_DRIVER" ]] && scheme="postgresql+$NEW_DRIVER"
        local base="$scheme://$NEW_USER:$NEW_PASSWORD@127.0.0.1:$port"
        ( umask 077
          printf '%s/%s\n' "$base" "$NEW_DB" >"$DIR/backend.uri"
          printf '%s/%s_auth\n' "$base" "$NEW_DB" >"$DIR/auth.uri" )
        log "created role '$NEW_USER' and databases '$NEW_DB', '${NEW_DB}_auth'"
    fi
    log "listening on 127.0.0.1:$port (log: $LOG_FILE); stop with: $0 stop $DIR"
    cat -- "$DIR/backend.uri"
}

cmd_stop() {
    resolve_dir "${1:-}"
    owner_of_existing
    BINDIR="$(find_bindir)"
    if ! is_running; then
        log "not running: $DIR"
        return 0
    fi
    as_owner "$BINDIR/pg_ctl" -D "$PGDATA_DIR" -m fast -w -t 60 stop >/dev/null
    log "stopped $DIR (remove it with: rm -rf $DIR)"
}

cmd_status() {
    resolve_dir "${1:-}"
    owner_of_existing
    BINDIR="$(find_bindir)"
    if is_running; then log "running: $DIR"; else log "stopped: $DIR"; return 3; fi
}

cmd_uri() {
    resolve_dir "${1:-}"
    case "${2:-backend}" in
        backend) cat -- "$DIR/backend.uri" ;;
        auth) cat -- "$DIR/auth.uri" ;;
        *) die "uri: second argument must be 'backend' or 'auth'" ;;
    esac
}

cmd_env() {
    resolve_dir "${1:-}"
    printf "export PEFTSWEEP_PG_URI='%s'\n" "$(cat -- "$DIR/backend.uri")"
    printf "export PEFTSWEEP_AUTH_DB_URI='%s'\n" "$(cat -- "$DIR/auth.uri")"
}

sub="${1:-}"
[[ $# -gt 0 ]] && shift
case "$sub" in
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    status) cmd_status "$@" ;;
    uri) cmd_uri "$@" ;;
    env) cmd_env "$@" ;;
    *) usage ;;
esac
