"""Summed proportional set size (PSS) of the driver and every rank, after a generate.

    python scripts/memory_pss.py SP KV_GB_PER_RANK     # e.g. 1 1.0, then 2 0.5 (the same total KV)

Default model, `dtype` auto, a 2,000-token prompt and 8 greedy tokens; prints each process's PSS
(from /proc/PID/smaps_rollup) and the sum, in MiB.
"""

import os
import re
import sys

from seqpar import LLM, SamplingParams


def pss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/smaps_rollup"):
        m = re.match(r"Pss:\s+(\d+) kB", line)
        if m:
            return int(m.group(1)) / 1024
    raise RuntimeError(f"no Pss line for process {pid}")


def main() -> None:
    sp, kv = int(sys.argv[1]), float(sys.argv[2])
    with LLM(sp_size=sp, kv_cache_gb=kv, enable_prefix_caching=False) as llm:
        llm.generate([[1] * 2000], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        pids = [os.getpid(), *llm.engine.rank_pids()]
        each = {pid: pss_mib(pid) for pid in pids}
    print(f"SP {sp}, {kv} GiB KV per rank: PSS per process (MiB) {[round(v) for v in each.values()]}")
    print(f"SP {sp}: summed PSS {sum(each.values()):.0f} MiB")


if __name__ == "__main__":
    main()
