#!/bin/sh
# Entry point of the csist-unmix images.
#
#   (no arguments)      the service: `csist serve` on $CSIST_HOST:$CSIST_PORT (0.0.0.0:8000);
#                       every other setting comes from the CSIST_* variables (README, Configuration)
#   --flag ...          the same with extra `csist serve` flags, e.g. --log-level debug
#   serve [--flag ...]  the same
#   replay ...          `csist replay ...`: the detector stand-in (docker-compose.yml)
#   anything else       run as given, e.g. `sh` or `python -c ...`
set -eu
serve() {
    exec csist serve --host "${CSIST_HOST:-0.0.0.0}" --port "${CSIST_PORT:-8000}" "$@"
}
if [ "$#" -eq 0 ]; then
    serve
fi
case "$1" in
    -*) serve "$@" ;;
    serve) shift; serve "$@" ;;
    replay) exec csist "$@" ;;
    *) exec "$@" ;;
esac
