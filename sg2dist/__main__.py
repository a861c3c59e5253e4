import sys

from sg2dist.cli import main

sys.exit(main())
