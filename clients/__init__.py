"""The NumPyClient that trains budget-sized EEN submodels, and the client objectives."""
