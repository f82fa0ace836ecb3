"""Allows ``python -m shardtcp``."""

import sys

from shardtcp.cli import main

sys.exit(main())
