"""NumPyClients (plain EEN client, split edge/cloud client) and the client objectives."""
