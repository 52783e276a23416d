"""One rank of a 2-process ``torchrun`` Trainer run with LossplugCallback (for the DDP test).

Writes ``rank<r>.json`` in the folder given: that rank's ``trainer.state.log_history`` and the
ranks that ran the rank-zero KPI.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lossplug
from lossplug.integrations.transformers import LossplugCallback
from test_hf_slices import DDP_SOURCES, keep_strings, with_sources
from test_hf_trainer_callback import make_trainer, rows


def main(out: Path) -> None:
    ran_on: list[int] = []

    def which_rank(ctx):
        import torch.distributed as dist

        ran_on.append(dist.get_rank())
        return float(ctx.step)

    kpi = lossplug.KPI("steps", which_rank, every_n_steps=3, timeout_s=60)
    trainer = make_trainer(
        out,
        LossplugCallback([kpi], slice_by="source"),
        collator=keep_strings,
        per_device_train_batch_size=2,
        per_device_eval_batch_size=3,
        ddp_backend="gloo",
    )
    # 2 batches of 3 on each rank: rank 0 reads the "a" rows, rank 1 the "b" and "c" ones
    trainer.eval_dataset = with_sources(rows(12, seed=2, uneven=True), DDP_SOURCES)
    trainer.train()
    rank = trainer.args.process_index
    payload = {"history": trainer.state.log_history, "ran_on": ran_on}
    (out / f"rank{rank}.json").write_text(json.dumps(payload))
    # Both ranks are done; leave without the interpreter's teardown, where freeing the DDP
    # model and gloo's threads now and then aborts the process ("terminate called without an
    # active exception") or hangs, whether or not the process group was destroyed first.
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
