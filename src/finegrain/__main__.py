import sys

from finegrain.cli.main import main

sys.exit(main())
