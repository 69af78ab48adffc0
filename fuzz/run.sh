#!/usr/bin/env bash
# Fuzzes every decoder of untrusted bytes in drover-protocol, one target after another,
# each for a bounded time, and prints a summary. Not run by CI.
#
#   fuzz/run.sh [SECONDS] [TARGET...]
#
# SECONDS per target defaults to 60; TARGETs default to all of `cargo fuzz list`.
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`) and a C/C++ compiler. cargo-fuzz
# passes nightly-only flags (sanitizers, coverage); this runs them on the pinned stable
# toolchain by setting RUSTC_BOOTSTRAP=1 for the fuzz build only.
#
# Corpus: fuzz/seeds/TARGET/ holds a few tiny checked-in examples (regenerate with
# `cd fuzz && cargo run --example gen-seeds`); whatever libFuzzer finds goes to
# fuzz/corpus/TARGET/ (git-ignored). A crash is written to fuzz/artifacts/TARGET/; replay
# it with `RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET fuzz/artifacts/TARGET/crash-...` and
# shrink it with `cargo fuzz tmin TARGET FILE`. Full logs: fuzz/target/run-logs/.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:-60}
if ! [[ $secs =~ ^[0-9]+$ ]] || ((secs == 0)); then
    echo "usage: fuzz/run.sh [SECONDS] [TARGET...]" >&2
    exit 2
fi
shift || true
export RUSTC_BOOTSTRAP=1
if (($# > 0)); then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list)
fi

logs=fuzz/target/run-logs
mkdir -p "$logs"
summary=()
failed=0
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t"
    echo "==> $t for ${secs}s"
    status=ok
    if ! cargo fuzz run "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$secs" -timeout=10 -print_final_stats=1 2>&1 | tee "$logs/$t.log"; then
        status=FAILED
        failed=1
    fi
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$logs/$t.log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$logs/$t.log" | tail -1)
    cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$logs/$t.log" | tail -1 || true)
    summary+=("$(printf '%-10s %-7s runs=%-10s exec/s=%-7s %s' "$t" "$status" "${runs:-?}" "${rate:-?}" "${cov:-}")")
done

echo
echo "==> summary (${secs}s per target)"
printf '%s\n' "${summary[@]}"
if ((failed)); then
    echo "crashes or errors: see fuzz/artifacts/ and $logs/" >&2
fi
exit "$failed"
