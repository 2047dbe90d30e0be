"""The data plane: topic contracts, the Faust app and agents, producers and topic admin."""
