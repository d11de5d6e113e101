"""Router: membership, pair choice, the public Generation API and the Admin API."""
