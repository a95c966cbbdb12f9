"""The regression gate's command line: ``python -m bench.gate ab=true`` (same-run A/B, what CI runs) or
``python -m bench.gate baseline=B candidate=C`` (committed numbers). See bench/gate/cli.py."""

import sys

from bench.gate.cli import main

sys.exit(main())
