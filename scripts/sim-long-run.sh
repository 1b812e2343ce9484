#!/usr/bin/env bash
# The simulator's long run (docs/DESIGN.md "The simulator"): 10^6 seeds and more, on the rules of
# one commit, in chunks that can run across many sessions and machines.
#
#   scripts/sim-long-run.sh [LAST [CHUNK]]   runs the chunks of seeds 0..LAST (default 1000000,
#                                            chunks of CHUNK seeds, default 4000) not yet recorded
#   scripts/sim-long-run.sh --sum            sums the recorded chunks of the current rules
#
# Each chunk appends one line to docs/sim-long-run.log: the rules' commit, its first seed, its
# seed count, the sweep's exit status, its seconds and the simulator's summary line (failing
# seeds, if any, follow it on lines of their own, and the run stops there). The rules' commit is the last one that
# touched what the simulator compiles (the modules below, the simulator, Cargo.lock); a chunk
# counts only for those rules, so any change to them starts the count again from seed 0, and
# uncommitted changes there are refused. Commit the log as chunks finish: a machine may not
# outlive its session.
set -euo pipefail
cd "$(dirname "$0")/.."

# The frontends' code is not the simulator's: only their request types (src/frontend/request.rs).
rules_paths=(src/config.rs src/core src/disk.rs src/frontend/request.rs src/meta src/replica src/wire
  src/lib.rs tests/replica_sim.rs tests/replica_sim Cargo.lock Cargo.toml)
log=docs/sim-long-run.log
usage() { sed -n 5,7p "$0" | sed 's/^# \{0,1\}//'; exit 2; }

if ! git diff --quiet HEAD -- "${rules_paths[@]}"; then
  echo "sim-long-run: uncommitted changes to the rules (${rules_paths[*]}): commit them first" >&2
  exit 1
fi
rules=$(git log -1 --format=%h -- "${rules_paths[@]}")
touch "$log"

sum() {
  python3 - "$rules" "$log" <<'EOF'
import re, sys
# Every chunk's summary line has the same words around its figures; the sums are put back
# into that text. A shape's name ("3+1") and a size ("4 KiB") are labels, not figures.
rules, path = sys.argv[1], sys.argv[2]
figure = re.compile(r"(?<![+\d.])\d+(?:\.\d+)?(?![+\d.]| KiB)")
pace = re.compile(r" in [\d.]+ s on \d+ threads \(\d+ seeds/s\)")
template, sums, seeds, secs, failed, ranges = None, None, 0, 0.0, [], []
for line in open(path):
    fields = line.rstrip("\n").split(" ", 5)
    if len(fields) < 6 or fields[0] != rules:
        continue
    first, count, rc, took = int(fields[1]), int(fields[2]), fields[3], float(fields[4].rstrip("s"))
    if rc != "rc=0":
        failed.append(first)
        continue
    summary = pace.sub("", fields[5])
    values = [float(v) for v in figure.findall(summary)]
    if template is None:
        template, sums = summary, [0.0] * len(values)
    elif figure.sub("#", summary) != figure.sub("#", template):
        sys.exit(f"chunk {first}: its summary has other words than the first chunk's")
    sums = [a + b for a, b in zip(sums, values)]
    seeds, secs = seeds + count, secs + took
    ranges.append((first, count))
ranges.sort()
covered, gaps = 0, []
for first, count in ranges:
    if first > covered:
        gaps.append((covered, first - 1))
    covered = max(covered, first + count)
print(f"rules {rules}: {seeds:,} seeds passed in {len(ranges)} chunks, seeds 0-{covered - 1:,}"
      + (f" with gaps {gaps}" if gaps else " without gaps")
      + f", {secs / 3600:.1f} hours of sweeping ({seeds / max(secs, 1):.1f} seeds/s)")
if failed:
    print(f"chunks with failing seeds (first seed of each): {failed}")
if template is not None:
    it = iter(sums)
    print(figure.sub(lambda m: f"{next(it):,.1f}" if "." in m.group() else f"{int(next(it)):,}", template))
EOF
}

case ${1:-} in
  --sum) sum; exit ;;
  -*) usage ;;
esac
last=${1:-1000000}; chunk=${2:-4000}
[[ $last =~ ^[0-9]+$ && $chunk =~ ^[1-9][0-9]*$ ]] || usage

cargo test --release --test replica_sim --no-run
built=$(cargo test --release --test replica_sim --no-run --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable") and "replica_sim" in m["executable"]][0])')
# A copy, so that a rebuild of the working tree while the chunks run does not change their rules.
bin=target/sim-long-run/replica_sim-$rules
mkdir -p target/sim-long-run
cp "$built" "$bin"
for ((first = 0; first < last; first += chunk)); do
  # A chunk that ran to its summary is done, failing seeds or not (a seed's world is
  # deterministic); one cut off before it runs again.
  if grep -q "^$rules $first $chunk rc=[0-9]* [0-9.]*s replica_sim: " "$log"; then
    continue
  fi
  started=$(date +%s.%N)
  rc=0
  out=$(BLKREPL_SIM_FIRST=$first BLKREPL_SIM_SEEDS=$chunk BLKREPL_SIM_KEEP_GOING=1 nice -n 10 "$bin" --nocapture 2>&1) || rc=$?
  took=$(python3 -c "import time; print(f'{time.time() - $started:.1f}')")
  summary=$(grep -m1 '^replica_sim: ' <<<"$out" || echo "no summary (the sweep did not finish)")
  { echo "$rules $first $chunk rc=$rc ${took}s $summary"; grep '^seed [0-9]* (shape' <<<"$out" | sed 's/^/  /' || true; } >> "$log"
  echo "seeds $first-$((first + chunk - 1)): rc=$rc in ${took}s"
  # A failing seed stops the run, said where the progress is read and by the exit status, not
  # only in the log: the rules need a fix, and the fix starts the count again.
  if [ "$rc" != 0 ]; then
    { grep '^seed [0-9]* (shape' <<<"$out" || echo "$summary"; } | sed 's/^/  FAILED: /' >&2
    sum
    echo "sim-long-run: seeds $first-$((first + chunk - 1)) failed: stopped (replay one with BLKREPL_SIM_SEED=N)" >&2
    exit 1
  fi
done
sum
