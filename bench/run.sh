#!/usr/bin/env bash
# Runs Sluice's benchmark scenarios end to end on this machine:
#   1. builds the server and the bench (release),
#   2. starts `sluice serve` on an ephemeral loopback port with a fresh data dir,
#   3. runs `sluice-bench all` against it (S1 with the raw-socket reference, S2, S3, S5),
#   4. starts a second server with bench/configs/s4.toml and runs `sluice-bench s4`, then a
#      fresh one for `sluice-bench stall` (memory per reader that stops reading),
#   5. runs S2 against the raw-socket reference (its floor: no engine, store or HTTP stack),
#   6. starts the scripted model server (`sluice-mock-llm --stamp`, 250 tokens at 50/s) and a
#      third server with one agent on it, and runs `sluice-bench agents` (1,000 agent runs),
#   7. stops every server and prints every table.
# Options: --big adds S2 at C=10,000 and 20 ev/s, on a fresh server of its own run with
# bench/configs/big.toml (so its RSS growth per run counts from a clean start).
# Everything is bounded: each bench invocation has a hard deadline, servers are stopped on exit.
set -euo pipefail

cd "$(dirname "$0")/.."
BIG=""
for arg in "$@"; do
  case "$arg" in
    --big) BIG="--big" ;;
    *) echo "usage: bench/run.sh [--big]" >&2; exit 2 ;;
  esac
done

# Many sockets: raise the open-files limit as far as allowed (S2 at C=1000 needs ~1,100 per
# process, C=10,000 ~11,000).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
echo "open files limit: $(ulimit -n)"

cargo build --release -p sluice -p sluice-bench -p sluice-mock-llm

WORK="$(mktemp -d)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  done
  rm -rf "$WORK"
}
trap cleanup EXIT

# start_server NAME [ARGS...]: starts a server, sets SERVER_URL and SERVER_PID.
start_server() {
  local name="$1"; shift
  local out="$WORK/$name.out"
  mkdir -p "$WORK/$name-data"
  SLUICE_LOG=warn target/release/sluice serve --listen 127.0.0.1:0 --data-dir "$WORK/$name-data" "$@" \
    >"$out" 2>"$WORK/$name.err" &
  SERVER_PID=$!
  PIDS+=("$SERVER_PID")
  SERVER_URL=""
  for _ in $(seq 1 100); do
    SERVER_URL="$(sed -n 's/^listening on \(http:\/\/[^ ]*\)$/\1/p' "$out" | head -n1)"
    [ -n "$SERVER_URL" ] && break
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then
      echo "server $name exited early:" >&2; cat "$WORK/$name.err" >&2; exit 1
    fi
    sleep 0.1
  done
  if [ -z "$SERVER_URL" ]; then
    echo "server $name printed no 'listening on' line within 10 s" >&2; exit 1
  fi
  echo "server $name: $SERVER_URL (pid $SERVER_PID)"
}

# start_helper NAME WHAT CMD...: starts a process that prints "listening on URL", sets HELPER_URL
# and HELPER_PID.
start_helper() {
  local name="$1" what="$2"; shift 2
  "$@" >"$WORK/$name.out" 2>"$WORK/$name.err" &
  HELPER_PID=$!
  PIDS+=("$HELPER_PID")
  HELPER_URL=""
  for _ in $(seq 1 100); do
    HELPER_URL="$(sed -n 's/^listening on \(http:\/\/[^ ]*\)$/\1/p' "$WORK/$name.out" | head -n1)"
    [ -n "$HELPER_URL" ] && return 0
    sleep 0.1
  done
  echo "$what did not start" >&2; cat "$WORK/$name.err" >&2; exit 1
}

stop_server() {
  kill "$1" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$1" 2>/dev/null || return 0; sleep 0.1; done
  echo "server $1 did not stop within 10 s of SIGTERM; killing it" >&2
  kill -9 "$1" 2>/dev/null || true
}

echo "== $(date -u '+%Y-%m-%d %H:%M UTC'), $(nproc) cores, commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"

start_server main
STATUS=0
target/release/sluice-bench all --server "$SERVER_URL" --server-pid "$SERVER_PID" \
  --deadline-secs 1500 | tee "$WORK/all.md" || STATUS=$?
stop_server "$SERVER_PID"
if [ -s "$WORK/main.err" ]; then
  echo "-- main server stderr (last 20 lines):"; tail -n 20 "$WORK/main.err"
fi

if [ -n "$BIG" ]; then
  start_server big --config bench/configs/big.toml
  target/release/sluice-bench s2 --server "$SERVER_URL" --runs 10000 --rate 20 \
    --server-pid "$SERVER_PID" --deadline-secs 900 | tee "$WORK/big.md" || STATUS=$?
  stop_server "$SERVER_PID"
fi

start_server s4 --config bench/configs/s4.toml
target/release/sluice-bench s4 --server "$SERVER_URL" --deadline-secs 300 \
  | tee "$WORK/s4.md" || STATUS=$?
stop_server "$SERVER_PID"
if [ -s "$WORK/s4.err" ]; then
  echo "-- s4 server stderr (last 20 lines):"; tail -n 20 "$WORK/s4.err"
fi

# Stalled readers, on a server of their own (the scenario measures its RSS from a fresh start).
start_server stall
target/release/sluice-bench stall --server "$SERVER_URL" --server-pid "$SERVER_PID" \
  --deadline-secs 300 | tee "$WORK/stall.md" || STATUS=$?
stop_server "$SERVER_PID"

# S2's floor on this machine: the same S2 against the raw reference in a process of its own,
# pacing its ticks like the ticker and writing each as it is made (no engine, store or HTTP stack).
start_helper raw "the raw reference" target/release/sluice-bench raw-reference --listen 127.0.0.1:0
RAW_URL="$HELPER_URL"; RAW_PID="$HELPER_PID"
target/release/sluice-bench s2 --server "$RAW_URL" --runs 1000 --rate 50 --server-pid "$RAW_PID" \
  --deadline-secs 300 | sed 's/^### S2$/### S2 floor: the raw reference, paced/' \
  | tee "$WORK/floor.md" || STATUS=$?
stop_server "$RAW_PID"

# The agent scenario: a scripted model streaming 250 stamped tokens at 50/s to each of 1,000
# concurrent runs of one agent.
start_helper mock "the mock model server" target/release/sluice-mock-llm --tokens 250 --rate 50 --stamp
MOCK_URL="$HELPER_URL"; MOCK_PID="$HELPER_PID"
sed "s|@MOCK_URL@|$MOCK_URL|" bench/configs/agents.toml >"$WORK/agents.toml"
start_server agents --config "$WORK/agents.toml"
target/release/sluice-bench agents --server "$SERVER_URL" --runs 1000 --tokens 250 --rate 50 \
  --server-pid "$SERVER_PID" --mock-pid "$MOCK_PID" --deadline-secs 300 \
  | tee "$WORK/agents.md" || STATUS=$?
stop_server "$SERVER_PID"
stop_server "$MOCK_PID"
if [ -s "$WORK/agents.err" ]; then
  echo "-- agents server stderr (last 20 lines):"; tail -n 20 "$WORK/agents.err"
fi

echo
echo "==================== summary ===================="
sed -n '/^### /,$p' "$WORK/all.md"
echo
if [ -n "$BIG" ]; then
  sed -n '/^### /,$p' "$WORK/big.md"
  echo
fi
sed -n '/^### /,$p' "$WORK/s4.md"
echo
sed -n '/^### /,$p' "$WORK/stall.md"
echo
sed -n '/^### /,$p' "$WORK/floor.md"
echo
sed -n '/^### /,$p' "$WORK/agents.md"
exit "$STATUS"
