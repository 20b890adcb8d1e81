"""async_eplb: an asynchronous expert-parallelism load balancer for vLLM.

The core (maps, placement policies, transfer planning, transports) needs only
torch and numpy; the vLLM-facing parts import vLLM lazily.
"""

__version__ = "0.1.0"
