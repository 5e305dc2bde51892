import sys

from arcdiff.cli.main import main

sys.exit(main())
