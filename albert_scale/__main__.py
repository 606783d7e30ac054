import sys

from albert_scale.cli import main

sys.exit(main())
