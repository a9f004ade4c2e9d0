"""A/B of --prefetch: alternating runs of one model loaded with and without it, in one
process, same tokens both ways. CASE `cold`: the page cache dropped before every token (each
miss reads the disk); `warm`: 1/8 of the experts cached, the page cache warm, each run after
other text has refilled the cache, reads buffered (as the bench's warm case). From the
repository root:

    .venv/bin/python .ci/ab-prefetch.py PACKED TOKENS ROUNDS [auto|direct|buffered] [cold|warm]"""

import sys

from edgemoe.coordinator.bench.ab import open_warm_eighth, run_line, summary
from edgemoe.coordinator.bench.decode import cold_run, refill, timed_generate

path, tokens, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
io_mode = sys.argv[4] if len(sys.argv) > 4 else "auto"
case_name = sys.argv[5] if len(sys.argv) > 5 else "cold"
assert case_name in ("cold", "warm"), f"CASE is cold or warm, not {case_name!r}"
cases = {name: open_warm_eighth(path, io_mode="buffered" if case_name == "warm" else io_mode,
                                prefetch=name == "prefetch") for name in ("prefetch", "no prefetch")}
timed_guesses = [0, 0]  # guessed, right: the timed runs' only


def once(case):
    if case_name == "warm":
        refill(case.sm, case.budget, tokens)
    guessed, right = case.sm.guesses()
    if case_name == "cold":
        run = cold_run(case.sm, case.paths, case.prompt_tokens, tokens, case.budget, every_token=True)
    else:
        run = timed_generate(case.sm, case.prompt_tokens, tokens)
    timed_guesses[0] += case.sm.guesses()[0] - guessed
    timed_guesses[1] += case.sm.guesses()[1] - right
    return run


runs: dict[str, list] = {name: [] for name in cases}
for _ in range(rounds):
    for name, case in cases.items():
        runs[name].append(once(case))
        print(run_line(name, runs[name][-1]), flush=True)
print(summary(runs))
print(f"guesses right in the timed runs: {timed_guesses[1]} of {timed_guesses[0]}")
for case in cases.values():
    case.sm.close()
