import sys

from prunekit.cli import main

sys.exit(main())
