import sys

from ps_worker.cli import main

sys.exit(main())
