"""Global-batch MoE load-balancing loss as a batchkit loss-stage plugin (``moe_lbl``)."""

from __future__ import annotations

from batchkit_moe_balance.capture import RouterCapture
from batchkit_moe_balance.capture import find_routers
from batchkit_moe_balance.formulas import load_balancing_loss
from batchkit_moe_balance.formulas import load_imbalance
from batchkit_moe_balance.formulas import routing_statistics
from batchkit_moe_balance.formulas import sequence_load_balancing_loss
from batchkit_moe_balance.plugin import MoELoadBalancing

__all__ = [
    "MoELoadBalancing",
    "RouterCapture",
    "find_routers",
    "load_balancing_loss",
    "load_imbalance",
    "routing_statistics",
    "sequence_load_balancing_loss",
]
