"""``python -m trainwell`` (also what ``torchrun -m trainwell`` runs)."""

from trainwell.cli import main

main()
