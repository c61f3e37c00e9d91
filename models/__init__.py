"""The experiment zoo's networks and LightningModules, one architecture per file (run from the checkout)."""
