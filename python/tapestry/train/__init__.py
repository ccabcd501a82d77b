"""DiLoCo training on torch.distributed: each rank one participant, the robust all-reduce between them.

    tapestry train --participants 4 --inner-steps 25 --rule trimmed_mean --f 1 --codec int8

From Python, one run as rank ``rank`` of an initialised process group::

    from tapestry.train import TrainConfig, TrainJob, train_rank
    record = train_rank(TrainJob(TrainConfig(rule="median", attack="nan", byzantine=0.25)), rank=r, world=4)

or spawned locally: ``tapestry.distributed.launch.run(job, nproc=4, device="cpu", target=train_rank)``.
"""

from __future__ import annotations

from .config import TrainConfig, validate
from .loop import RunRecord, TrainJob, train_rank

__all__ = ["TrainConfig", "validate", "TrainJob", "RunRecord", "train_rank"]
