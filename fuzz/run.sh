#!/usr/bin/env bash
# Runs every cargo-fuzz target (or those named) over its committed seeds plus the working corpus.
#   ./fuzz/run.sh smoke [target...]     a few seconds each (CI)
#   ./fuzz/run.sh campaign [target...]  10,000,000 executions each (FUZZ_RUNS to change)
# Needs a nightly toolchain (cargo +nightly) and cargo-fuzz; without nightly it says so and
# exits 0: the proptest fallback (gateway/tests/decoders.rs) runs in `cargo test` regardless.
# A crash stops the run with libFuzzer's report and the input under fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")"
mode="${1:-smoke}"
shift || true
if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: no nightly toolchain here; skipping cargo fuzz (decoders.rs proptests still run)"
  exit 0
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  cargo install --locked cargo-fuzz --version 0.13.2
fi
targets=("$@")
((${#targets[@]})) || mapfile -t targets < <(cargo +nightly fuzz list)
case "$mode" in
  smoke) budget=(-max_total_time="${FUZZ_SECONDS:-3}") ;;
  campaign) budget=(-runs="${FUZZ_RUNS:-10000000}") ;;
  *) echo "usage: $0 smoke|campaign [target...]" >&2; exit 2 ;;
esac
cargo +nightly fuzz build
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  start=$(date +%s)
  echo "== fuzz $t ($mode)"
  # -max_len 16 KiB: past every decoder's interesting structure, and cheap per execution.
  # -print_funcs=0: libFuzzer would symbolize new functions through a pipe that breaks here.
  log="corpus/$t.log"
  status=0
  cargo +nightly fuzz run "$t" "corpus/$t" "seeds/$t" -- \
    "${budget[@]}" -max_len=16384 -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 -print_funcs=0 \
    >"$log" 2>&1 || status=$?
  grep -E '^(stat::(number_of_executed_units|average_exec_per_sec|peak_rss_mb)|Done|SUMMARY|ERROR|==[0-9]+==|thread .* panicked)' "$log" || true
  if [ "$status" -ne 0 ]; then tail -40 "$log"; fi
  echo "== $t: exit $status, $(($(date +%s) - start)) s"
  [ "$status" -eq 0 ] || exit "$status"
done
