"""Where and how a run runs: its environment, recorded beside its results."""
