"""swarm: peer-to-peer DiLoCo over a Kademlia DHT. An asyncio library that knows nothing about models."""

from swarm.codec import Codec, make_codec
from swarm.diloco import Swarm, SwarmConfig
from swarm.matchmaking import Group, MatchmakingConfig
from swarm.node import NodeConfig, SwarmConnectionError, SwarmNode
from swarm.outer import MomentumRamp
from swarm.report import OuterStepReport, StepStatus

__all__ = [
    "Codec",
    "Group",
    "MatchmakingConfig",
    "MomentumRamp",
    "NodeConfig",
    "OuterStepReport",
    "StepStatus",
    "Swarm",
    "SwarmConfig",
    "SwarmConnectionError",
    "SwarmNode",
    "make_codec",
]
