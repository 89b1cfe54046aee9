"""``python -m agro_dist``: train with AGRO on Ray (see ``agro_dist.driver`` and ``--help``)."""

import sys

from agro_dist.driver import main

if __name__ == "__main__":
    sys.exit(main())
