"""``python -m xatl_ds.data prepare ...`` (the same as ``xatl-ds data prepare ...``)."""
import sys

from xatl_ds.cli import main

sys.exit(main(["data", *sys.argv[1:]]))
