"""python -m kvmfs.guests [NAME...]: assemble the guest images that are missing or stale."""
import sys

from kvmfs.guests import main

main(sys.argv[1:])
