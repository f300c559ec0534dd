"""`python -m benchmarks`: the whole suite (see benchmarks/suite.py, or --help)."""

from benchmarks.suite import main

raise SystemExit(main())
