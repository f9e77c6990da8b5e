import sys

from ps_worker.demo.worker_cli import main

sys.exit(main())
