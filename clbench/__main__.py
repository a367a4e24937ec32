import sys

from clbench.cli import main

sys.exit(main())
