"""What sits on the core: the demo, ablations, sweeps, report, viewer and tiny models."""
