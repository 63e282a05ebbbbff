import sys

from rlhf.label.cli import main

sys.exit(main(sys.argv[1:]))
