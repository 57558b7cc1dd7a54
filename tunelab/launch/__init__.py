"""How training processes are started and how they share the model (distributed strategies)."""
