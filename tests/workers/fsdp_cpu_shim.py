"""TEST-ONLY: let an FSDP launch config shard on CPU processes (gloo), as it does on GPUs.

accelerate (``state.py``, ``AcceleratorState.__init__``) turns ``ACCELERATE_USE_FSDP`` into FSDP only for GPU-like
multi-device types; on ``MULTI_CPU`` it silently runs DDP. Torch's FSDP2 itself trains on CPU and gloo, so for
the engine tests this shim finishes what accelerate skips: after the state is built, a ``MULTI_CPU`` state of an
FSDP launch becomes an FSDP state holding the launch's FSDP plugin. Nothing in the package imports it; it is installed by
``engine_worker.py`` when ``RLVR_TEST_FSDP_CPU=1``.
"""

from __future__ import annotations

import os

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


def install() -> None:
    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and (
            self.distributed_type == DistributedType.MULTI_CPU
        ):
            # The state is rebuilt more than once (TrainingArguments resets it): the plugin comes from the same
            # launch environment as the one accelerate's Accelerator builds.
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin or FullyShardedDataParallelPlugin()

    AcceleratorState.__init__ = init
