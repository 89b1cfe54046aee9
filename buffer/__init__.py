"""The replay buffer (installed as ``agro_dist.buffer``): groups of completions in Redis as Arrow.

``ReplayBuffer`` is the data plane between generator actors and the learner; ``RedisServer``
starts a private loopback-only Redis when no ``redis_url`` is given. The record contract is
``agro_dist.core.records``.
"""

from .replay import BufferConfig, BufferFull, BufferTimeout, ReplayBuffer, SampleBatch, SampledGroup, replay_count
from .server import RedisServer, find_redis_server

__all__ = ["BufferConfig", "BufferFull", "BufferTimeout", "ReplayBuffer", "SampleBatch", "SampledGroup", "replay_count", "RedisServer", "find_redis_server"]
