"""How many preemptions a steady overload causes, by admission watermark (no model: the scheduler alone).

Requests arrive at a steady rate faster than the KV cache can serve them; each step every running sequence
decodes one token (a fake model) and the output processor's token rules end it at ``max_tokens``. Without a
watermark, admission may take every free block and the next decode step preempts the newcomer again
(recomputing its prompt later); a watermark keeps a few blocks for the running decodes to grow into.

    python benchmarks/preemption_watermark.py                 # the table that chose WATERMARK_FRACTION
    python benchmarks/preemption_watermark.py --num-blocks 4096

Prints, per watermark: preemptions, recomputed tokens (the cost of preemption), steps to drain, and the
mean number of sequences per step (the batch size admission keeps: what a too-large watermark costs).
"""

from __future__ import annotations

import argparse
import random

from nanoserve.engine.output_processor import token_finish
from nanoserve.engine.scheduler import Scheduler, SchedulerLimits
from nanoserve.engine.sequence import Sequence
from nanoserve.kvcache.block_manager import BlockManager
from nanoserve.sampling_params import SamplingParams


def simulate(
    watermark_blocks: int, num_blocks: int, block_size: int, num_requests: int, arrivals_per_step: float, seed: int
) -> dict[str, float]:
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
    limits = SchedulerLimits(
        max_num_seqs=256, max_num_batched_tokens=512, max_model_len=num_blocks * block_size,
        watermark_blocks=watermark_blocks,
    )  # fmt: skip
    sched = Scheduler(limits, bm)
    added = steps = batch_total = computed = 0
    credit = 0.0
    while added < num_requests or sched.has_unfinished():
        credit += arrivals_per_step
        while credit >= 1 and added < num_requests:
            credit -= 1
            prompt = [rng.randrange(1000) for _ in range(rng.randint(32, 256))]
            params = SamplingParams(max_tokens=rng.randint(32, 256), ignore_eos=True)
            sched.add(Sequence(added, f"r{added}", 0, prompt, len(prompt), params))
            added += 1
        out = sched.schedule()
        steps += 1
        batch_total += len(out.chunks)
        computed += out.num_batched_tokens
        tokens = [7 for c in out.chunks if c.sample]
        advanced = sched.update_from_output(out, tokens)
        sched.finish_seqs(f for s in advanced if (f := token_finish(s, 7, set(), limits.max_model_len)) is not None)
    return {
        "preemptions": sched.num_preemptions,
        "computed_tokens": computed,
        "steps": steps,
        "mean_batch": batch_total / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-blocks", type=int, default=1024)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-requests", type=int, default=400)
    parser.add_argument("--arrivals-per-step", type=float, default=0.5)
    parser.add_argument("--fractions", default="0,0.005,0.01,0.02,0.05,0.1")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print(f"{args.num_blocks} blocks x {args.block_size} tokens, {args.num_requests} requests, "
          f"{args.arrivals_per_step} arrivals/step, prompts 32-256, outputs 32-256, {args.seeds} seeds")  # fmt: skip
    print(f"{'watermark':>10} {'blocks':>7} {'preemptions':>12} {'computed tok':>13} {'steps':>7} {'seqs/step':>10}")
    for fraction in (float(f) for f in args.fractions.split(",")):
        blocks = 0 if fraction == 0 else max(1, int(args.num_blocks * fraction))
        runs = [
            simulate(blocks, args.num_blocks, args.block_size, args.num_requests, args.arrivals_per_step, seed)
            for seed in range(args.seeds)
        ]
        mean = {k: sum(r[k] for r in runs) / len(runs) for k in runs[0]}
        print(f"{fraction:>10.3f} {blocks:>7} {mean['preemptions']:>12.1f} {mean['computed_tokens']:>13.0f} "
              f"{mean['steps']:>7.0f} {mean['mean_batch']:>10.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
