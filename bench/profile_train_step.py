"""Where a training step's time goes: torch.profiler over a few steps of ds-loradrop's trainer and of
the PEFT peer (the bench/train_throughput.py set-up, one process), top operators by self CPU time.

    python bench/profile_train_step.py --task e2e --steps 4
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from contenders import OursContender, PeerContender, build_model, prepare_rows
from torch.profiler import ProfilerActivity, profile
from train_throughput import parse_args

from ds_loradrop.method.placement import attach_own_adapters
from ds_loradrop.training import engine as ds_engine


def main() -> None:
    args = parse_args()
    ds_engine.init_distributed()
    tokenizer, warmup_rows, timed_rows = prepare_rows(args)
    pad = tokenizer.pad_token_id
    for name in ("peer", "ours"):
        model = build_model(args, len(tokenizer))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            if name == "peer":
                peer = PeerContender(args, model, pad)
                peer.train(warmup_rows, 0, args.warmup_steps)
                peer.train(timed_rows, 0, args.steps)
            else:
                ours = OursContender(
                    args, model, lambda lay: attach_own_adapters(lay, args.lora_r, 2 * args.lora_r, 0.0), pad
                )
                ours.train(warmup_rows, 0, args.warmup_steps)
                ours.train(timed_rows, 0, args.steps)
                ds_engine.destroy_engine(ours.engine)
        print(
            f"\n## {name}: top operators by self CPU time ({args.warmup_steps} warm-up + {args.steps} "
            "steps)\n"
        )
        print(
            prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=40)
        )
    ds_engine.shutdown_distributed()


if __name__ == "__main__":
    main()
