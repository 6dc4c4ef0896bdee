#!/bin/sh
# Coverage-guided fuzzing of the vdisk format readers and NBD server with cargo-fuzz
# (libFuzzer).
#
#   fuzz/run.sh TARGET SECONDS [LIBFUZZER FLAGS...]   fuzz TARGET for SECONDS on one core
#   fuzz/run.sh --cmin TARGET                          fold new inputs into the committed
#                                                      corpus and minimise it
#   fuzz/run.sh --list                                 list the targets
#
# Targets: descriptor, sparse_header, stream, cowd, sesparse, partitions,
# open_and_read, nbd_handshake, nbd_requests. Their bodies are vdisk::fuzzing::*,
# vdisk_mount::fuzzing::* and vdisk_nbd::fuzzing::*; vdisk/tests/fuzz_replay.rs,
# vdisk-mount/tests/fuzz_replay.rs and vdisk-nbd/tests/fuzz_replay.rs replay the
# corpus and the regression inputs with `cargo test`.
#
# Needs `cargo install cargo-fuzz`. cargo-fuzz passes nightly-only flags to rustc;
# RUSTC_BOOTSTRAP=1 lets a stable toolchain accept them. Builds are release with
# debug assertions and overflow checks, and AddressSanitizer (cargo-fuzz defaults).
#
# Inputs: fuzz/corpus/TARGET (committed, minimised, every file within the target's
# max_len), fuzz/seeds/TARGET (committed: a few whole real files larger than max_len
# that reach code the small inputs do not; the fuzzer sees them truncated, the replay
# tests whole), fuzz/work/seeds/TARGET (made by
# `cargo test -p vdisk --test fuzz_replay -- --ignored make_seeds` and
# `cargo test -p vdisk-mount --test fuzz_replay -- --ignored make_partition_seeds` and
# `cargo test -p vdisk-nbd --test fuzz_replay -- --ignored make_nbd_seeds`),
# new inputs go to fuzz/work/corpus/TARGET (not committed). A crash, timeout or
# out-of-memory input is written to fuzz/artifacts/TARGET/; once fixed, keep it as
# fuzz/regressions/TARGET/<what-it-was> and list its answer in the replay test.
#
# Limits: -max_len per target (below); -timeout=10 s per input; -rss_limit_mb=1024;
# -malloc_limit_mb=256 (one allocation above that is reported as out-of-memory:
# every allocation the library makes is bounded by vdisk/src/limits.rs, far below).
set -eu
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1
TARGETS="descriptor sparse_header stream cowd sesparse partitions open_and_read nbd_handshake nbd_requests"

# Largest input per target. Small, so the committed corpus stays small: seeds above
# it are truncated when loaded (their mutants still reach the same code).
max_len() {
    case "$1" in
        descriptor | nbd_handshake | nbd_requests) echo 16384 ;;
        sesparse | open_and_read) echo 65536 ;;
        *) echo 32768 ;;
    esac
}

dict() {
    case "$1" in
        descriptor | open_and_read) echo "-dict=dict/descriptor.dict" ;;
        nbd_handshake | nbd_requests) echo "-dict=dict/nbd.dict" ;;
        *) echo "" ;;
    esac
}

case "${1:-}" in
    --list)
        for t in $TARGETS; do echo "$t"; done
        ;;
    --cmin)
        # The committed corpus and the new inputs of work/corpus, those within the
        # target's max_len, minimised by edge coverage (no hit counts: fewer files).
        t="$2"
        max="$(max_len "$t")"
        tmp="work/cmin/$t"
        rm -rf "$tmp"
        mkdir -p "$tmp" "corpus/$t" "work/corpus/$t"
        find "corpus/$t" "work/corpus/$t" -type f -size -"$((max + 1))"c -exec cp {} "$tmp"/ \;
        cargo fuzz cmin "$t" "$tmp" -- -max_len="$max" -use_counters=0 -rss_limit_mb=1024
        rm -rf "corpus/$t"
        mv "$tmp" "corpus/$t"
        ;;
    "" | -*)
        sed -n '2,9p' "$0"
        exit 2
        ;;
    *)
        t="$1"
        secs="${2:?usage: fuzz/run.sh TARGET SECONDS}"
        shift 2
        mkdir -p "work/corpus/$t" "corpus/$t" "artifacts/$t"
        seeds=""
        [ -d "seeds/$t" ] && seeds="seeds/$t"
        [ -d "work/seeds/$t" ] && seeds="$seeds work/seeds/$t"
        # shellcheck disable=SC2046,SC2086
        exec cargo fuzz run "$t" "work/corpus/$t" "corpus/$t" $seeds -- \
            -max_total_time="$secs" -max_len="$(max_len "$t")" $(dict "$t") \
            -timeout=10 -rss_limit_mb=1024 -malloc_limit_mb=256 -print_final_stats=1 \
            -artifact_prefix="artifacts/$t/" "$@"
        ;;
esac
