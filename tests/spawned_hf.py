"""Rank code for the registration tests: a module that never imports
`overlap.integrations.transformers`, as a user's rank code may not. Run by a fresh `RankPool`
(spawned processes) and as a torchrun script: ``torchrun --nproc-per-node 2 tests/spawned_hf.py PATH``
prints one JSON line per rank."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist


def load_and_run(path: str) -> dict:
    """Load `path` with ``ep_implementation="overlap"`` and run one forward on this rank's prompt."""
    imported_before = "overlap.integrations.transformers" in sys.modules
    from overlap.integrations.tiny_models import load_expert_parallel  # imports overlap, not the integration

    model = load_expert_parallel(path, "overlap")
    impls = sorted({type(m.__dict__["_overlap_ep"]).__name__ for m in model.modules() if "_overlap_ep" in m.__dict__})
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(dist.get_rank()))
    with torch.no_grad():
        logits = model(ids).logits
    return {
        "rank": dist.get_rank(),
        "imported_before_load": imported_before,
        "implementations": impls,
        "finite": bool(torch.isfinite(logits.float()).all()),
    }


if __name__ == "__main__":  # under torchrun
    dist.init_process_group("gloo")
    try:
        # One write(2) per line, under PIPE_BUF: the ranks share torchrun's stdout, and print's
        # separate writes of the text and the newline interleaved two ranks' lines under load.
        os.write(1, (json.dumps(load_and_run(sys.argv[1])) + "\n").encode())
    finally:
        from overlap import ops

        ops.shutdown()  # as docs/faults.md asks: the lanes go before the groups they hold
        dist.destroy_process_group()
