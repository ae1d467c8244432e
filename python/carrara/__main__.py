import sys

from carrara.cli import main

sys.exit(main())
