#!/usr/bin/env bash
# Runs nginx on loopback for development and tests, never the system's instance:
#   nginx/nginx.sh render DIR --listen 127.0.0.1:8080 --upstream unix:/abs/app.sock [--keep-conn on|off] [--root DIR]
#   nginx/nginx.sh render DIR --listen 127.0.0.1:8080 --hosts A:9000,B:9000 [--keep-conn on|off]
#        [--connect-timeout 1s] [--read-timeout 60s] [--fail-timeout 10s]   (upstream-hosts.conf.in)
#   nginx/nginx.sh start DIR     (foreground: the caller owns the pid)
#   nginx/nginx.sh stop DIR      (graceful: QUIT to the pid in DIR/nginx.pid)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
nginx_bin=$(command -v nginx || echo /usr/sbin/nginx)

usage() { sed -n '2,7p' "$0" >&2; exit 2; }

cmd=${1:-}; dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || usage
shift 2

case "$cmd" in
render)
    listen=127.0.0.1:8080 upstream= hosts= keep_conn=on root=$here/public
    connect_timeout=1s read_timeout=60s fail_timeout=10s
    while [ $# -gt 0 ]; do
        case "$1" in
        --listen) listen=$2; shift 2 ;;
        --upstream) upstream=$2; shift 2 ;;
        --hosts) hosts=$2; shift 2 ;;
        --keep-conn) keep_conn=$2; shift 2 ;;
        --connect-timeout) connect_timeout=$2; shift 2 ;;
        --read-timeout) read_timeout=$2; shift 2 ;;
        --fail-timeout) fail_timeout=$2; shift 2 ;;
        --root) root=$2; shift 2 ;;
        *) usage ;;
        esac
    done
    [ -n "$upstream" ] || [ -n "$hosts" ] || usage
    template=$here/nginx.conf.in servers=
    if [ -n "$hosts" ]; then
        template=$here/upstream-hosts.conf.in
        for h in ${hosts//,/ }; do
            servers+="        server $h max_fails=1 fail_timeout=$fail_timeout;\\n"
        done
    fi
    mkdir -p "$dir/tmp"
    dir=$(cd "$dir" && pwd)
    user=
    # As root, nginx's workers would run as nobody and could not reach a 0660 socket.
    [ "$(id -u)" -eq 0 ] && user="user $(id -un) $(id -gn);"
    sed -e "s|@PREFIX@|$dir|g" -e "s|@LISTEN@|$listen|g" -e "s|@UPSTREAM@|$upstream|g" \
        -e "s|@KEEP_CONN@|$keep_conn|g" -e "s|@ROOT@|$root|g" -e "s|@USER@|$user|g" \
        -e "s|@SERVERS@|$servers|g" -e "s|@CONNECT_TIMEOUT@|$connect_timeout|g" \
        -e "s|@READ_TIMEOUT@|$read_timeout|g" "$template" > "$dir/nginx.conf"
    cp "$here/fastcgi_params" "$dir/fastcgi_params"
    "$nginx_bin" -t -q -p "$dir" -c "$dir/nginx.conf"
    ;;
start)
    dir=$(cd "$dir" && pwd)
    exec "$nginx_bin" -p "$dir" -c "$dir/nginx.conf"
    ;;
stop)
    [ -f "$dir/nginx.pid" ] && kill -QUIT "$(cat "$dir/nginx.pid")"
    ;;
*) usage ;;
esac
