"""The reference AP-S: the user checks and call records a customer's application server
keeps, over SQLite (docs/aps-api.md). For tests, demos and integrators to read."""
