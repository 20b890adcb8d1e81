"""``python -m vllm.distributed.async_eplb.simulate``: the simulated deployment.

See ``simulation/cli.py`` (also the ``async-eplb-simulate`` console script).
"""

import sys

from vllm.distributed.async_eplb.simulation.cli import main

if __name__ == "__main__":
    sys.exit(main())
