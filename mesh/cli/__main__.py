import sys

from mesh.cli import run

sys.exit(run())
