import sys

from heron.cli.main import main

sys.exit(main())
