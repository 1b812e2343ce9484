#!/usr/bin/env bash
# Fuzzing (docs/DESIGN.md "Fuzzing"): builds the libFuzzer targets of fuzz/ on the stable
# toolchain and runs each from its seed corpus (fuzz/corpus/<target>), one process on one core,
# niced.
#
#   scripts/fuzz.sh [RUNS [TARGET...]]          RUNS inputs per target (default 20000): CI
#   scripts/fuzz.sh --time SECONDS [TARGET...]  a campaign: each target for SECONDS
#   scripts/fuzz.sh --seeds                     rewrites fuzz/corpus from the real encoders
#
# Fails on the first target that crashes (a panic in any thread, an abort, an allocation over
# the target's cap, a timeout), printing the reproducer's path and the command that replays it.
# What the fuzzer adds to the corpus stays in $FUZZ_WORK (default: fuzz-work in the cargo target
# directory), never in the repository, so later runs start from what earlier ones found.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n 5,7p "$0" | sed 's/^# \{0,1\}//'; exit 2; }

mode=runs; amount=20000
case ${1:-} in
  --seeds) scripts/setup.sh fuzz
           # Plain build, no coverage flags: the generator is not a fuzz target.
           exec cargo run --release --quiet --manifest-path fuzz/Cargo.toml --bin make-corpus ;;
  --time) mode=campaign; amount=${2:-}; shift 2 || usage ;;
  -*) usage ;;
  '') ;;
  *) amount=$1; shift ;;
esac
[[ $amount =~ ^[0-9]+$ ]] || usage
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for f in fuzz/fuzz_targets/*.rs; do targets+=("$(basename "$f" .rs)"); done
fi
for t in "${targets[@]}"; do
  [ -f "fuzz/fuzz_targets/$t.rs" ] || { echo "fuzz: no target '$t' in fuzz/fuzz_targets" >&2; exit 2; }
done

scripts/setup.sh fuzz
# What cargo-fuzz passes, minus the address sanitizer (nightly only): libFuzzer's coverage
# counters and comparison tracing on every crate, which the stable compiler supports through
# LLVM's sanitizer-coverage pass. An explicit --target keeps these flags off build scripts and
# proc macros, and the artifacts apart from the normal build's.
host=$(rustc -vV | sed -n 's/^host: //p')
coverage=(-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table
  -Cllvm-args=-sanitizer-coverage-trace-compares)
export RUSTFLAGS="${RUSTFLAGS:-} ${coverage[*]}"
bin_args=()
for t in "${targets[@]}"; do bin_args+=(--bin "$t"); done
echo "fuzz: building ${targets[*]}"
cargo build --release --quiet --manifest-path fuzz/Cargo.toml --target "$host" "${bin_args[@]}"
target_dir=$(cargo metadata --format-version 1 --no-deps --manifest-path fuzz/Cargo.toml |
             sed 's/.*"target_directory":"\([^"]*\)".*/\1/')
bins=$target_dir/$host/release
work=${FUZZ_WORK:-$target_dir/fuzz-work}

if [ "$mode" = runs ]; then limit=(-runs="$amount"); else limit=(-max_total_time="$amount"); fi
for t in "${targets[@]}"; do
  mkdir -p "$work/corpus/$t" "$work/artifacts" "$work/logs"
  log=$work/logs/$t.log
  # New inputs go to the first directory; the seeds are only read. -timeout: one input taking
  # longer is a hang (the NBD target gives up on a session after 20 s itself).
  status=0
  nice -n 10 "$bins/$t" "${limit[@]}" -timeout=60 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$work/artifacts/$t-" \
    "$work/corpus/$t" "fuzz/corpus/$t" >"$log" 2>&1 || status=$?
  stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -1; }
  if [ $status -ne 0 ]; then
    tail -40 "$log" >&2
    echo "fuzz: $t FAILED (exit $status); full log: $log" >&2
    sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | while read -r input; do
      echo "fuzz: reproducer $input; replay: $bins/$t $input" >&2
    done
    exit 1
  fi
  # libFuzzer's rate is runs per whole second: none under a second.
  rate=$(stat average_exec_per_sec); [ "$rate" != 0 ] || rate="-"
  printf 'fuzz: %-18s %10s runs in %6s s, %6s exec/s, corpus %5s inputs, no crash\n' "$t" \
    "$(stat number_of_executed_units)" \
    "$(awk '/Done [0-9]+ runs in/ { print $(NF-1) }' "$log" | tail -1)" "$rate" \
    "$(find "$work/corpus/$t" "fuzz/corpus/$t" -type f | wc -l)"
done
