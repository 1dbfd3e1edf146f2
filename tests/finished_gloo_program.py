"""A 2-rank program that does what a finished job does with its process group, then exits.

Started by ``tests/test_clean_exit.py`` (through ``tests/rank_launcher.py``): the project's
``init_distributed``, the kinds of collectives a job runs (all-reduce, broadcast, all-gather, barrier),
then the project's ``shutdown_distributed`` unless ``--no_teardown`` is given.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import deepspeed
import torch

from ds_loradrop.training import engine

engine.init_distributed()
values = torch.ones(4096)
for _ in range(5):
    deepspeed.comm.all_reduce(values)
    deepspeed.comm.broadcast(values, 0)
gathered = [torch.zeros(4096) for _ in range(int(os.environ["WORLD_SIZE"]))]
deepspeed.comm.all_gather(gathered, values)
deepspeed.comm.barrier()
if "--no_teardown" not in sys.argv:
    engine.shutdown_distributed()
print(f"finished rank {os.environ['RANK']}", flush=True)
