"""``python -m agro_dist``: train with AGRO on Ray (see ``agro_dist.run.driver`` and ``--help``)."""

import sys

from agro_dist.run.driver import main

if __name__ == "__main__":
    sys.exit(main())
