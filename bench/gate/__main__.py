"""The regression gate's command line: ``python -m bench.gate ab=true`` (same-run A/B, what CI runs) or
``python -m bench.gate baseline=B candidate=C`` (committed numbers). See bench/gate/regress.py."""

import sys

from bench.gate.regress import main

sys.exit(main())
