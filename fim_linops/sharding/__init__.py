"""Models whose parameters live on several processes: FSDP2 (``fully_shard``, DTensor shards) and
``DistributedDataParallel`` wrappers. :func:`gathered` gives the plain module the engine runs;
:func:`fisher_sharded` builds a Fisher of which each rank keeps only its share
(:class:`ShardedFisher`)."""

from typing import Any

from fim_linops.sharding.gather import gathered, is_sharded, on_plain_model, plain_type, unwrap

__all__ = [
    "ShardedFisher",
    "fisher_sharded",
    "gathered",
    "is_sharded",
    "on_plain_model",
    "plain_type",
    "unwrap",
]


def __getattr__(name: str) -> Any:
    # imported on first use: the operators import this package (gathered) at their own import
    if name == "fisher_sharded":
        from fim_linops.sharding.build import fisher_sharded

        return fisher_sharded
    if name == "ShardedFisher":
        from fim_linops.sharding.operator import ShardedFisher

        return ShardedFisher
    raise AttributeError(f"module 'fim_linops.sharding' has no attribute {name!r}")
