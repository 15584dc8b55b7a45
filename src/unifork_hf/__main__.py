"""`python -m unifork_hf ...` is the `unifork` command; launchers use it: `torchrun -m unifork_hf train ...`."""

from .cli import main

main()
