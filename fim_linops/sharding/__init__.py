"""Models whose parameters live on several processes: FSDP2 (``fully_shard``, DTensor shards) and
``DistributedDataParallel`` wrappers. :func:`gathered` gives the plain module the engine runs."""

from fim_linops.sharding.gather import gathered, is_sharded, on_plain_model, plain_type, unwrap

__all__ = ["gathered", "is_sharded", "on_plain_model", "plain_type", "unwrap"]
