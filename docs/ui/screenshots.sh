#!/usr/bin/env bash
# Screenshots of a sweep in the MLflow UI, taken with headless Chromium.
#
# usage: bash docs/ui/screenshots.sh STORE_URI EXPERIMENT_NAME [OUTDIR]
#
#   STORE_URI        the tracking store, as in mlflow.yaml's tracking_uri: sqlite:///path/to/mlflow.db (a relative
#                    path is taken from the current folder, as MLflow does), a file store folder, or the
#                    http(s):// address of a tracking server that is already running (then none is started)
#   EXPERIMENT_NAME  the experiment, as in mlflow.yaml's experiment (e.g. cats-vs-dogs)
#   OUTDIR           where the PNGs go (default: this script's folder, docs/ui)
#
# It starts `mlflow server` on a free port of 127.0.0.1 with that backend store, waits until it answers, finds the
# experiment and the sweep's trial runs through MLflow's REST API, writes
#   OUTDIR/experiment.png  the experiment's runs table, the sweep's run expanded to its trials
#   OUTDIR/compare.png     MLflow's Compare page of the trial runs (#/compare-runs?runs=[...]&experiments=[...])
# and stops the server when it exits. Each screenshot is taken once the page shows the run names and has stopped
# changing (docs/ui/capture.py drives Chromium over the DevTools protocol).
#
# Environment (all optional):
#   SWEEP_RUN=ID_OR_NAME  which sweep (its parent run); default: the newest run tagged kind=sweep
#   WINDOW_SIZE=1600,1000 the window; its height grows up to MAX_HEIGHT (default 3000) so every run shows
#   MAX_WIDTH=4600        also widen the Compare page so every trial's column shows (default: no wider than
#                         WINDOW_SIZE; the parallel-coordinates plot shows all trials either way)
#   PAGE_TIMEOUT=120      seconds to wait for each page
#   MLFLOW=...            the mlflow command (default: this repository's .venv/bin/mlflow, else mlflow on PATH);
#                         capture.py runs with the python next to it (it needs aiohttp, a dependency of mlflow)
#   CHROMIUM=...          the browser (default: chromium, chromium-browser or google-chrome on PATH)
#
# Needs Chromium; on Debian/Ubuntu: apt-get install -y --no-install-recommends chromium fonts-dejavu-core
# The script itself writes nothing to the store; the server runs without MLflow's job runner and refuses a store
# whose schema is older than this MLflow's rather than upgrade it (run `mlflow db upgrade` first if so).
set -euo pipefail

usage() {
    sed -n '4,10p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}
[[ $# -ge 2 && $# -le 3 ]] || usage
[[ $1 != -h && $1 != --help ]] || usage

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
STORE=$1
EXPERIMENT=$2
OUTDIR=${3:-$HERE}

fail() { echo "screenshots.sh: $*" >&2; exit 1; }

if [[ -n ${MLFLOW:-} ]]; then
    :
elif [[ -x $REPO/.venv/bin/mlflow ]]; then
    MLFLOW=$REPO/.venv/bin/mlflow
else
    MLFLOW=$(command -v mlflow) || fail "no mlflow command; set MLFLOW=/path/to/venv/bin/mlflow"
fi
PYTHON=$(dirname "$MLFLOW")/python
[[ -x $PYTHON ]] || PYTHON=$(command -v python3) || fail "no python next to $MLFLOW"
if [[ -z ${CHROMIUM:-} ]]; then
    for candidate in chromium chromium-browser google-chrome google-chrome-stable; do
        CHROMIUM=$(command -v "$candidate") && break || CHROMIUM=
    done
fi
[[ -n $CHROMIUM ]] || fail "no Chromium found; install it (apt-get install -y --no-install-recommends chromium) \
or set CHROMIUM=/path/to/chrome"

# A local store: make its path absolute (the server runs in a scratch folder) and refuse one that is not there,
# rather than let the server create an empty store.
case $STORE in
    sqlite:///*)
        db=${STORE#sqlite:///}
        query=
        if [[ $db == *\?* ]]; then query="?${db#*\?}"; db=${db%%\?*}; fi
        [[ $db == /* ]] || db=$PWD/$db
        [[ -f $db ]] || fail "no SQLite store at $db"
        STORE="sqlite:///$db$query"
        ;;
    http://* | https://*) ;;
    *://*) ;;  # another database or a remote store: given to the server as it is
    *)
        path=${STORE#file://}
        [[ $path == /* ]] || path=$PWD/$path
        [[ -d $path ]] || fail "no file store at $path"
        STORE=$path
        ;;
esac

mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/sweep-ui.XXXXXX")
SERVER_PID=
CAPTURE_PID=
SHOW_LOG=

stop_group() {  # stop a process group this script started (set -m gave it one), and nothing else
    local pid=$1
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    if [[ $(ps -o pgid= -p "$pid" | tr -d ' ') == "$pid" ]]; then
        kill -TERM -- "-$pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.2; done
        kill -KILL -- "-$pid" 2>/dev/null || true
    else
        kill -TERM "$pid" 2>/dev/null || true
    fi
}

cleanup() {
    local status=$?
    stop_group "$CAPTURE_PID"  # Chromium runs in capture.py's group
    stop_group "$SERVER_PID"   # the mlflow CLI and the uvicorn worker it started
    if [[ -n $SHOW_LOG && -s $SCRATCH/server.log ]]; then
        echo "--- last lines of the MLflow server's log:" >&2
        tail -n 20 "$SCRATCH/server.log" >&2
    fi
    rm -rf "$SCRATCH"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ $STORE == http://* || $STORE == https://* ]]; then
    BASE=${STORE%/}
    echo "using the running MLflow server at $BASE"
else
    PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    BASE=http://127.0.0.1:$PORT
    echo "starting mlflow server on $BASE for $STORE"
    # set -m: the server gets a process group of its own, so that cleanup stops all of it and only it
    set -m
    (cd "$SCRATCH" && MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false exec "$MLFLOW" server \
        --backend-store-uri "$STORE" --host 127.0.0.1 --port "$PORT" --workers 1 >"$SCRATCH/server.log" 2>&1) &
    SERVER_PID=$!
    set +m
fi

for _ in $(seq 120); do
    if "$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/health", timeout=2)' \
        "$BASE" 2>/dev/null; then
        break
    fi
    [[ -z $SERVER_PID ]] || kill -0 "$SERVER_PID" 2>/dev/null || { SHOW_LOG=1; fail "mlflow server exited"; }
    sleep 0.5
done
"$PYTHON" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/health", timeout=5)' "$BASE" \
    2>/dev/null || { SHOW_LOG=1; fail "$BASE did not answer within 60 s"; }

# In the background and waited for, so that Ctrl-C or a TERM stops it at once (bash runs traps only between
# commands); TMPDIR puts Chromium's scratch profile under $SCRATCH.
set -m
TMPDIR=$SCRATCH "$PYTHON" "$HERE/capture.py" --base "$BASE" --experiment "$EXPERIMENT" --out "$OUTDIR" \
    --chromium "$CHROMIUM" --log "$SCRATCH/chromium.log" &
CAPTURE_PID=$!
set +m
wait "$CAPTURE_PID"
