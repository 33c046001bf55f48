# Sourced by the launch scripts (REPO set): the interpreter, the entry point and checks of
# the environment they read.
PYTHON=${PYTHON:-$( [ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3 )}
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # moetrain without an install too
ENTRY=${MOETRAIN_ENTRY:--m moetrain.train}
# A script named relative to the repository (MOETRAIN_ENTRY=scripts/bench_ep.py) runs from
# anywhere.
case "$ENTRY" in
    -m*|/*) ;;
    *) if [ ! -e "${ENTRY%% *}" ] && [ -e "$REPO/${ENTRY%% *}" ]; then ENTRY="$REPO/$ENTRY"; fi ;;
esac

positive_int() {  # NAME VALUE: one line and exit 2 unless VALUE is an integer >= 1
    if ! [[ "$2" =~ ^[0-9]+$ ]] || [ "$2" -lt 1 ]; then
        echo "$(basename "$0"): $1=$2 must be an integer >= 1" >&2
        exit 2
    fi
}
