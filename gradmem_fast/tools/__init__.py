"""Developer tools (compile checks and the like); not part of the user API."""
