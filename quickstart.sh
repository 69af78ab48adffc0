#!/usr/bin/env bash
# Builds everything, starts a server with its embedded broker and a local agent, signs
# and publishes the built-in plugins, and runs the inventory plugin on the local agent.
#
# Everything lives in ./drover-demo (removed and recreated on each run). The server and
# the agent keep running afterwards so you can try more; the script prints how to stop
# them.
set -euo pipefail
cd "$(dirname "$0")"
root=$PWD
demo=$root/drover-demo

say() { printf '\033[1m%s\033[0m\n' "$*" >&2; }

say "==> building (release): plugins for wasm32-wasip2, then drover and drover-agent"
rustup target add wasm32-wasip2 >/dev/null
# Plugins build into plugins/target whatever CARGO_TARGET_DIR says: the tests look there.
(cd plugins && CARGO_TARGET_DIR=target cargo build --release --locked)
cargo build --release --locked --bins
bin=${CARGO_TARGET_DIR:-$root/target}/release
wasm=$root/plugins/target/wasm32-wasip2/release

# Stop what a previous run left behind.
if [ -f "$demo/pids" ]; then
    while read -r pid; do kill "$pid" 2>/dev/null || true; done <"$demo/pids"
    sleep 1
fi
rm -rf "$demo"
mkdir -p "$demo"
export DROVER_DATA_DIR=$demo/server
drover() { "$bin/drover" "$@"; }

say "==> keys"
drover keygen

say "==> starting the server (embedded MQTT broker, control plane, SQLite, HTTP API)"
# Port 0: free ports are picked and written to server.json, so nothing on this machine
# (such as a system Mosquitto on 1883) gets in the way.
"$bin/drover" serve --api-listen 127.0.0.1:0 --mqtt-listen 127.0.0.1:0 >"$demo/server.log" 2>&1 &
echo $! >>"$demo/pids"
for _ in $(seq 100); do [ -f "$DROVER_DATA_DIR/server.json" ] && break; sleep 0.1; done
[ -f "$DROVER_DATA_DIR/server.json" ] || { cat "$demo/server.log"; exit 1; }
cat "$DROVER_DATA_DIR/server.json" >&2

say "==> signing and publishing the built-in plugins"
cp "$wasm/drover_plugin_inventory.wasm" "$demo/inventory.wasm"
cp "$wasm/drover_plugin_misbehave.wasm" "$demo/misbehave.wasm"
cp "$wasm/drover_plugin_command.wasm" "$demo/command.wasm"
drover plugin sign "$demo/inventory.wasm" --name inventory --version 1 \
    --world inventory-collector --host-facts --read-path /var/lib/dpkg
drover plugin publish "$demo/inventory.wasm"
drover plugin sign "$demo/misbehave.wasm" --name misbehave --version 1 --world task
drover plugin publish "$demo/misbehave.wasm"
# Run Command asks for any program: only agents whose policy has exec = ["*"] run it.
drover plugin sign "$demo/command.wasm" --name command --version 1 --world command-runner --exec '*'
drover plugin publish "$demo/command.wasm"

say "==> starting a local agent"
# `--allow-exec '*'` lets this demo agent run commands (as the user running this script).
drover agents add local --out "$demo/agent.toml" --agent-data-dir "$demo/agent" --tag env=demo \
    --allow-exec '*'
"$bin/drover-agent" --config "$demo/agent.toml" >"$demo/agent.log" 2>&1 &
echo $! >>"$demo/pids"
for _ in $(seq 100); do
    drover --output json agents list | grep '"online": true' >/dev/null && break
    sleep 0.1
done
drover agents list

say "==> running inventory on the local agent"
start=$(date +%s%N)
drover run inventory --targets local
end=$(date +%s%N)
say "==> done in $(( (end - start) / 1000000 )) ms (first run: fetch in chunks, verify, compile, run)"
drover run inventory --targets local >/dev/null 2>&1
start=$(date +%s%N)
drover run inventory --targets tag:env=demo >/dev/null 2>&1
end=$(date +%s%N)
say "==> a second run, with the compiled plugin cached: $(( (end - start) / 1000000 )) ms end to end through the CLI"

say "==> a command on every agent, its output followed live"
drover run-command --targets all --follow --script 'uname -sr; uptime'

pids=$(tr '\n' ' ' <"$demo/pids")
cat >&2 <<TXT

Where to look next (the server and agent are still running):
  export DROVER_DATA_DIR=$DROVER_DATA_DIR
  $bin/drover agents list
  $bin/drover plugin list
  $bin/drover run inventory --targets all --output json      # the full inventory
  $bin/drover run misbehave --targets local --timeout 2s --input '{"mode":"spin"}'
                                                  # a runaway plugin, stopped at its deadline
  $bin/drover run-command --targets all --max-concurrency 10% --max-errors 1 -- df -h /
  $bin/drover command list                        # recent commands: states and exit codes
  $bin/drover command show ID                     # per-target state, exit code, output
  $bin/drover agents events                       # refusals and other agent reports
  logs: $demo/server.log  $demo/agent.log
  stop: kill $pids
TXT
