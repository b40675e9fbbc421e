"""``python -m batchgen.bench [options]``: the same as ``batchgen bench``."""

from batchgen.bench.run import main

raise SystemExit(main())
