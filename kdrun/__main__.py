"""``python -m kdrun``: the kdrun command (what ``torchrun --nproc_per_node=N -m kdrun`` starts)."""

from kdrun.cli.main import main

main()
